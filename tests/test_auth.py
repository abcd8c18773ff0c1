"""Relay keys: bearer parsing, the key ring (plain and sha256: keys), key ids."""

import hashlib

import pytest

from wsrelay import auth

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("header, token", [
    ("Bearer abc", "abc"),
    ("bearer abc", "abc"),
    ("BEARER abc", "abc"),
    ("BeArEr abc", "abc"),
    ("  Bearer   abc  ", "abc"),
    ("Bearer sk-proj-AbC_123.xyz", "sk-proj-AbC_123.xyz"),
])
def test_bearer_token_is_parsed_with_a_case_insensitive_scheme(header, token):
    assert auth.bearer_token(header) == token


@pytest.mark.parametrize("header", [None, "", "   ", "Bearer", "Bearer ", "Bearer    ", "Basic dXNlcjpwYXNz",
                                    "Token abc", "Bearerabc", "abc"])
def test_bearer_token_is_none_without_a_bearer_token(header):
    assert auth.bearer_token(header) is None


def test_empty_key_ring_is_passthrough():
    ring = auth.KeyRing([])
    assert ring.enabled is False
    assert ring.check("anything") is False
    assert ring.check(None) is False
    assert auth.KeyRing().enabled is False


def test_plain_key_is_accepted_and_nothing_else():
    ring = auth.KeyRing(["relay-key-1"])
    assert ring.enabled is True
    assert ring.check("relay-key-1") is True
    assert ring.check("relay-key-2") is False
    assert ring.check("relay-key-1 ") is False
    assert ring.check("RELAY-KEY-1") is False
    assert ring.check("") is False
    assert ring.check(None) is False


def test_sha256_key_accepts_the_key_whose_digest_it_is():
    digest = hashlib.sha256(b"relay-key-1").hexdigest()
    ring = auth.KeyRing(["sha256:" + digest])
    assert ring.check("relay-key-1") is True
    assert ring.check("relay-key-2") is False
    assert ring.check(digest) is False
    assert ring.check("sha256:" + digest) is False


def test_sha256_digest_may_be_upper_case():
    digest = hashlib.sha256(b"relay-key-1").hexdigest().upper()
    assert auth.KeyRing(["sha256:" + digest]).check("relay-key-1") is True


def test_plain_and_sha256_keys_mix():
    ring = auth.KeyRing(["first", "sha256:" + hashlib.sha256(b"second").hexdigest(), "third"])
    assert [ring.check(k) for k in ("first", "second", "third", "fourth")] == [True, True, True, False]


def test_non_ascii_key():
    ring = auth.KeyRing(["clé-ünïcode"])
    assert ring.check("clé-ünïcode") is True
    assert ring.check("cle-unicode") is False


def test_digest_is_the_sha256_hex_of_the_key():
    assert auth.digest("abc") == hashlib.sha256(b"abc").hexdigest()


def test_key_id_is_stable_short_and_does_not_contain_the_key():
    key = "sk-relay-0123456789abcdef"
    first = auth.key_id(key)
    assert first == auth.key_id(key)
    assert first == auth.key_id(str(key))
    assert key not in first and first not in key
    assert len(first) == 16
    assert all(c in "0123456789abcdef" for c in first)


def test_key_ids_differ_between_keys():
    ids = {auth.key_id("key-%d" % i) for i in range(200)}
    assert len(ids) == 200



def test_key_id_is_the_digest_prefix_not_a_reversible_encoding():
    key = "sk-relay-0123456789abcdef"
    assert auth.key_id(key) == hashlib.sha256(key.encode()).hexdigest()[:16]
    assert auth.KeyRing(["sha256:" + auth.digest(key)]).check(key) is True
