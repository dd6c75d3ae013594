"""The CLI run as a user runs it (`python -c CLI_WITH_PEAK task=...`), printing its own peak RSS at exit as
`PEAK_RSS_KB=<n>` on stderr: what the memory tests and benchmarks read."""

CLI_WITH_PEAK = ("import atexit, runpy, sys\n"
                 "def peak():\n"
                 "    status = open('/proc/self/status').read().split('VmHWM:')[1]\n"
                 "    sys.stderr.write(f'PEAK_RSS_KB={int(status.split()[0])}\\n')\n"
                 "atexit.register(peak)\n"
                 "sys.argv = ['rlm_pipelines', *sys.argv[1:]]\n"
                 "runpy.run_module('rlm_pipelines', run_name='__main__')\n")
