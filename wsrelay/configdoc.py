"""The configuration's documents, generated from :data:`wsrelay.config.SETTINGS`: the commented sample
(``etc/wsrelay.yaml``, ``bin/wsrelay check-config --print-defaults``) and README's settings reference
(``--print-reference``).  Tests check that both files match what is generated here."""

import yaml

from .config import SETTINGS


def render_yaml():
    """The commented sample configuration (``etc/wsrelay.yaml``), every setting with its default."""
    lines = ["# wsrelay configuration. Every setting, with its default.",
             "# Generated from wsrelay/config.py: `bin/wsrelay check-config --print-defaults`.", ""]
    tree = {}
    for setting in SETTINGS:
        node = tree
        parts = setting.name.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = setting

    def emit(node, depth):
        for key, value in node.items():
            pad = "  " * depth
            if isinstance(value, dict):
                lines.append("%s%s:" % (pad, key))
                emit(value, depth + 1)
                if depth == 0:
                    lines.append("")
                continue
            for doc_line in _wrap(value.doc, 100 - len(pad)):
                lines.append("%s# %s" % (pad, doc_line))
            default = value.default
            rendered = yaml.safe_dump({key: default}, default_flow_style=True, width=1000).strip()[1:-1]
            lines.append("%s%s" % (pad, rendered.replace(": null", ": null")))

    emit(tree, 0)
    return "\n".join(lines).rstrip() + "\n"


def _wrap(text, width):
    words, line, out = text.split(), "", []
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            out.append(line)
            line = word
        else:
            line = (line + " " + word) if line else word
    if line:
        out.append(line)
    return out


def render_reference():
    """The settings as an reStructuredText definition list (the README's configuration reference)."""
    out = []
    for setting in SETTINGS:
        default = setting.default
        shown = "none" if default is None or default == [] else "``%s``" % (default,)
        out.append("``%s``" % setting.name)
        out.append("    " + (setting.doc if "Default:" in setting.doc else "%s Default: %s." % (setting.doc, shown)))
        out.append("")
    return "\n".join(out) + "\n"
