"""The pieces of bench/run: processes (procs), the stack under test (stack), the scenarios, profiling, report."""
