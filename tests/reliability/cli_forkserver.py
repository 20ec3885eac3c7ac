"""A tiny fork server for the reliability tests: imports dictbench once, then forks one
child per request to run ``dictbench.cli.main(argv)`` (see reliability_helpers.py).

Protocol on stdin/stdout, one JSON object per line. Request: ``{"argv": [...], "env":
{...}, "stdout": path, "stderr": path}``. Reply: ``{"returncode": int}``, negative
for a child killed by a signal (-9 after SIGKILL), like ``subprocess`` reports it.
The server itself only imports modules and never runs torch work, so forking it is
as safe as starting a fresh interpreter.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

PRELOAD = (
    "torch",
    "dictbench.cli",
    "dictbench.runner",
    "transformers.models.llama.modeling_llama",
    "transformers.models.llama.configuration_llama",
)


def _child(req: dict) -> int:
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    os.environ.clear()
    os.environ.update(req["env"])
    import torch

    torch.set_num_threads(1)  # the same in every run, so float sums are reproducible
    from dictbench import cli

    return cli.main(req["argv"])


def main() -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(req)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            code = -os.WTERMSIG(status)
        else:
            code = os.WEXITSTATUS(status)
        print(json.dumps({"returncode": code}), flush=True)


if __name__ == "__main__":
    main()
