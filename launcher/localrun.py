"""Supervisor of a local job: runs the command, appends its output to the log, records the exit code.

`python -m launcher.localrun --log LOG --rc RC -- CMD...`. It leads its own process group, so that
`mbl cancel` can signal the whole job (torchrun and every rank) at once.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--log", required=True)
    parser.add_argument("--rc", required=True)
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd and args.cmd[0] == "--" else args.cmd
    with open(args.log, "ab", buffering=0) as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def forward(signum: int, _frame: object) -> None:
            proc.send_signal(signum)

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, forward)
        rc = proc.wait()
    tmp = Path(args.rc + ".tmp")
    tmp.write_text(f"{rc}\n")
    os.replace(tmp, args.rc)
    return 0 if rc == 0 else (rc if 0 < rc < 256 else 1)


if __name__ == "__main__":
    sys.exit(main())
