"""`lmtrain bench ...`: side-by-side measurements that report ratios (not timed tests).

Each configuration is measured in its own process, so that one configuration's peak
memory or allocator state cannot leak into another's, and the configurations alternate
round by round, so that a change in the machine's load hits all of them alike. Results are
recorded in docs/benchmarks.md with the command, the machine and the date.
"""
