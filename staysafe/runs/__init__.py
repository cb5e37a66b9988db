"""Run directories: the trace format, atomic writes, untrusted-file reading, process liveness, paths, fault
injection, metric column names."""
