"""The worker's loop: read a request frame, do it, answer with one result frame.

Requests are {"id", "op", "args"}; answers {"id", "ok": true, "result"} or {"id", "ok":
false, "error": {"message", "cause", "kind", "traceback"}}; progress is {"id", "event":
"progress", "done", "total"}. stdout is reserved for frames: fd 1 is pointed at stderr so
that nothing the framework prints can corrupt the protocol.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
import traceback
from typing import Any

from . import protocol


class Worker:
    def __init__(self, out) -> None:
        self.out = out
        self.model: Any = None
        self.path: Any = None
        self.config: Any = None
        self.specs: Any = None
        self._request_id = None
        self.start_path = list(sys.path)

    def emit(self, event: dict) -> None:
        event = dict(event)
        event["id"] = self._request_id
        protocol.write_frame(self.out, event)

    # -- ops -----------------------------------------------------------------------------
    def op_hello(self, args):
        import platform
        return {"pid": os.getpid(), "python": platform.python_version(),
                "implementation": platform.python_implementation().lower(),
                "executable": sys.executable}

    def op_inventory(self, args):
        from .inventory import installed
        # The path as the interpreter started: importing a framework can extend it (TF 2.15
        # pulls in setuptools, which puts its own _vendor folder on sys.path), and vendored
        # copies are no installed distributions.
        return installed(self.start_path)

    def op_prepare(self, args):
        """Import the framework (the slow part), apply settings, import custom modules."""
        from .framework import apply_settings, framework_facts, import_keras, import_tf
        from .loading import load_extra_modules
        t0 = time.time()
        import_tf()
        applied = apply_settings(args.get("settings") or {})
        import_keras()
        for p in args.get("sys_path_append") or []:
            if p not in sys.path:
                sys.path.append(p)
        modules = load_extra_modules(args.get("modules"), args.get("sys_path"),
                                     strict=not args.get("modules_optional", False))
        from .customcode import describe_module
        return {"framework": framework_facts(), "applied": applied, "modules": modules,
                "module_facts": [describe_module(m) for m in modules],
                "import_seconds": time.time() - t0}

    def op_load(self, args):
        from .customcode import add_distributions, config_objects
        from .loading import file_metadata, load_model, read_file_config
        from .model import custom_objects, input_specs, static_findings, untracked_arrays
        custom = {}
        for name, (module, attr) in (args.get("custom_objects") or {}).items():
            import importlib
            with contextlib.suppress(Exception):  # if missing, Keras says which object it lacks
                custom[name] = getattr(importlib.import_module(module), attr)
        t0 = time.time()
        if self.model is not None:
            # A reused worker: forget the last model, so this load sees a fresh session.
            from .framework import import_keras
            self.model = None
            with contextlib.suppress(Exception):
                import_keras().backend.clear_session()
        self.path = args["path"]
        if args.get("caller_settings"):
            # envlock.save: the training process's global dtype policy, floatx and op
            # determinism, so that the reloaded model is built as the in-memory one was.
            from .framework import apply_caller_settings
            apply_caller_settings(args["caller_settings"])
        if args.get("import_config_modules"):
            # Keras resolves custom objects by registered name; registration happens when their
            # module is imported. At save the file is the user's own, so import what it names.
            from .loading import config_modules, load_extra_modules
            load_extra_modules(config_modules(read_file_config(self.path)), [], strict=False)
        self.config = read_file_config(self.path)
        for name, obj in config_objects(self.config).items():
            custom.setdefault(name, obj)
        self.model = load_model(self.path, safe_mode=args.get("safe_mode", True),
                                custom_objects=custom or None)
        self.specs = input_specs(self.model, self.path, args.get("inputs"))
        described = custom_objects(self.model, self.config, custom)
        add_distributions(described)
        from .loading import honour_stored_jit
        jit = honour_stored_jit(self.model, self.path)
        return {
            "jit_compile": jit,
            "load_seconds": time.time() - t0,
            "inputs": self.specs,
            "custom_objects": described,
            "static_findings": static_findings(self.model),
            "untracked_arrays": untracked_arrays(self.model),
            "file_metadata": file_metadata(self.path),
        }

    def op_facts(self, args):
        from .framework import determinism_facts, framework_facts
        return {"framework": framework_facts(), "determinism": determinism_facts()}

    def op_fingerprint(self, args):
        from .fingerprint import fingerprint_model
        return fingerprint_model(self._need_model())

    def op_stored_weights(self, args):
        from .storedweights import stored_weights
        return stored_weights(args.get("path") or self.path)

    def op_random_layer(self, args):
        import numpy as np

        from .model import random_layer
        with np.load(args["input"], allow_pickle=False) as npz:
            inputs = {k: npz[k] for k in npz.files}
        return {"layer": random_layer(self._need_model(), inputs)}

    def op_make_probe(self, args):
        import numpy as np

        from .arrays import probe_inputs
        self._need_model()
        arrays = probe_inputs(self.specs, seed=int(args.get("seed", 0)), rows=int(args.get("rows", 16)))
        np.savez(args["path"], **arrays)
        return {"names": list(arrays)}

    def op_predict(self, args):
        """Predict ``input`` (npy/npz) into ``output`` (.npy, or .npz for several outputs)."""
        import numpy as np

        from .arrays import check_inputs, predict_to_files, read_inputs
        model = self._need_model()
        arrays = read_inputs(args["input"], self.specs)
        check_inputs(arrays, self.specs)
        output = args["output"]
        tmp = tempfile.mkdtemp(prefix=".envlock-out-", dir=os.path.dirname(os.path.abspath(output)))
        try:
            every = max(1, int(args.get("progress_every", 1)))
            calls = [0]

            def progress(done, total):
                calls[0] += 1
                if calls[0] % every == 0 or done == total:
                    self.emit({"event": "progress", "done": done, "total": total})

            t0 = time.time()
            meta = predict_to_files(model, arrays, int(args.get("batch_size", 32)), tmp, progress)
            seconds = time.time() - t0
            npz = args.get("format") == "npz" or len(meta) > 1 or output.endswith(".npz")
            if npz:
                import zipfile
                with zipfile.ZipFile(output, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                    for m in meta:
                        zf.write(m["file"], m["name"] + ".npy")
            else:
                os.replace(meta[0]["file"], output)
            del np
            return {"outputs": [{k: v for k, v in m.items() if k != "file"} for m in meta],
                    "format": "npz" if npz else "npy", "seconds": seconds}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def op_shutdown(self, args):
        return {"bye": True}

    def _need_model(self):
        if self.model is None:
            from .loading import WorkerFailure
            raise WorkerFailure("no model loaded", kind="protocol")
        return self.model


def main() -> int:
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    inp = sys.stdin.buffer
    worker = Worker(out)
    protocol.write_frame(out, {"event": "ready", "pid": os.getpid(), "python": sys.version.split()[0]})
    while True:
        try:
            req = protocol.read_frame(inp)
        except protocol.ProtocolError as exc:
            sys.stderr.write("envlock worker: %s\n" % exc)
            return 2
        if req is None:
            return 0
        worker._request_id = req.get("id")
        op = req.get("op", "")
        handler = getattr(worker, "op_" + op, None)
        try:
            if handler is None:
                raise ValueError("unknown op %r" % op)
            result = handler(req.get("args") or {})
            answer = {"id": req.get("id"), "ok": True, "result": result}
        except BaseException as exc:  # answered, never fatal: the host decides
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            answer = {"id": req.get("id"), "ok": False, "error": {
                "message": str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                "type": type(exc).__name__,
                "cause": getattr(exc, "cause", None),
                "kind": getattr(exc, "kind", "internal"),
                "traceback": traceback.format_exc(),
            }}
            traceback.print_exc()
        protocol.write_frame(out, answer)
        if op == "shutdown":
            return 0
