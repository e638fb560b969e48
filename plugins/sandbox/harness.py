"""The harness: the program that runs inside the sandbox (``python -I -S -B -c HARNESS``), sets the
resource limits, runs the generated program in the job's test style and writes the report. It is
sent as source text and imports nothing from this package."""

# Runs inside the sandbox as `python -I -S -B -c HARNESS`. Standard input: the marshalled job (read
# to the end, then replaced by /dev/null); standard output: the report channel (moved to another
# descriptor, then replaced by /dev/null); standard error: setup diagnostics (replaced by /dev/null
# before program code runs). The report starts with b"R\n".
#
# Styles:
#   probe   report b"P\n"
#   stdio   run the program as __main__ once per input (a fresh fork each, stdin = the input, stdout
#           captured); report per case "exit signal exception truncated length\n" + the raw output
#   call    run the program, call job["fn_name"] with each argument list; report "C " + one JSON line
#           [{"v": json of the value} | {"e": exception type} | {"u": unserializable type}]
#   assert  run the program, then the tests, in this process; report the token of the outcome
HARNESS = r'''
def _rlctl_harness():
    import posix as os, sys
    _write, _exit, _read = os.write, os._exit, os.read
    rep = os.dup(1)
    _write(rep, b"R\n")
    chunks = []
    while True:
        chunk = _read(0, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    import marshal, resource
    job = marshal.loads(b"".join(chunks))
    del chunks
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    keep = sorted({0, 1, 2, rep, null})
    for low, high in zip(keep, keep[1:] + [1 << 16]):
        if high > low + 1:
            os.closerange(low + 1, high)
    style = job["style"]
    sys.path.extend(job["site"])
    pid1 = bool(job["pidns"]) and os.getpid() == 1  # only then may kill(-1) be used: it stays in the namespace
    file_bytes = job["file_bytes"]
    for name, value in job["rlimits"].items():
        kind = getattr(resource, name, None)
        if kind is None:
            continue
        if name == "RLIMIT_FSIZE" and style == "stdio":
            value = 2 * value + (1 << 20)  # the harness writes the report; each case gets `value`
        soft, hard = resource.getrlimit(kind)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(kind, (value, value))
    if style == "probe":
        _write(rep, b"P\n")
        _exit(0)
    import builtins
    import _sitebuiltins  # exit() and quit(), which `-S` leaves out
    builtins.exit = _sitebuiltins.Quitter("exit", "Ctrl-D (i.e. EOF)")
    builtins.quit = _sitebuiltins.Quitter("quit", "Ctrl-D (i.e. EOF)")
    _compile, _exec, _BaseException, _MemoryError = compile, exec, BaseException, MemoryError

    def reap():
        if pid1:
            import signal
            while True:
                try:
                    os.kill(-1, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    os.waitpid(-1, 0)
                except ChildProcessError:
                    return

    def write_all(fd, data):
        view = memoryview(data)
        while view:
            view = view[_write(fd, view):]

    try:
        code = _compile(job["code"], "<solution>", "exec")
    except _BaseException as exc:
        _write(rep, b"E %s\n" % type(exc).__name__.encode())
        _exit(0)

    if style == "stdio":
        used = 0
        for text in job["inputs"]:
            data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else bytes(text)
            inp = os.memfd_create("stdin", 0)
            write_all(inp, data)
            os.lseek(inp, 0, 0)
            out = os.memfd_create("stdout", 0)
            exc_fd = os.memfd_create("exception", 0)
            pid = os.fork()
            if pid == 0:
                try:
                    os.dup2(inp, 0)
                    os.dup2(out, 1)
                    os.dup2(null, 2)
                    for fd in (inp, out, rep, null):
                        os.close(fd)
                    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
                    status = 0
                    try:
                        _exec(code, {"__name__": "__main__", "__builtins__": builtins})
                    except SystemExit as exc:
                        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                    except _BaseException as exc:
                        _write(exc_fd, type(exc).__name__.encode()[:100])
                        status = 1
                    try:
                        sys.stdout.flush()
                    except _BaseException as exc:
                        _write(exc_fd, type(exc).__name__.encode()[:100])
                        status = status or 1
                    _exit(status & 0xFF)
                finally:
                    _exit(1)
            _, status = os.waitpid(pid, 0)
            reap()
            exit_code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
            sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
            os.lseek(exc_fd, 0, 0)
            exc_name = _read(exc_fd, 100).decode("ascii", "replace").split()[:1] or ["-"]
            size = os.fstat(out).st_size
            room = max(0, file_bytes - used)
            truncated = int(size > room)
            os.lseek(out, 0, 0)
            chunks, left = [], min(size, room)
            while left > 0:
                chunk = _read(out, min(left, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
            output = b"".join(chunks)
            used += len(output)
            for fd in (inp, out, exc_fd):
                os.close(fd)
            write_all(rep, b"%d %d %s %d %d\n" % (exit_code, sig, exc_name[0].encode(), truncated, len(output)))
            write_all(rep, output)
            if status != 0 or truncated:
                break
        _exit(0)

    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    os.dup2(null, 2)

    if style == "call":
        import json
        _dumps = json.dumps
        namespace = {"__name__": "solution", "__builtins__": builtins}
        try:
            _exec(code, namespace)
        except _BaseException as exc:
            _write(rep, b"E %s\n" % type(exc).__name__.encode())
            _exit(0)
        name = job["fn_name"]
        fn = namespace.get(name)
        if fn is None and isinstance(namespace.get("Solution"), type):
            try:
                fn = getattr(namespace["Solution"](), name, None)
            except _BaseException:
                fn = None
        if not callable(fn):
            _write(rep, b"E NameError\n")
            _exit(0)
        results = []
        for args in job["inputs"]:
            try:
                value = fn(*args)
            except _BaseException as exc:
                results.append({"e": type(exc).__name__})
                continue
            try:
                results.append({"v": _dumps(value)})
            except _BaseException:
                results.append({"u": type(value).__name__})
        write_all(rep, b"C " + _dumps(results).encode() + b"\n")
        _exit(0)

    # assert style: the tests run in this process after the program. The verdict is one of the
    # per-outcome tokens the trainer generated; the program cannot read them (below), and seeing the
    # token of its own (non-passing) outcome does not help it to forge another.
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE 0: no /proc/<pid>/mem for other processes
        _exit(3)
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # so that asyncio.run() does not install a handler
    guard = job["signal_filter"]
    if guard:  # no Python signal handlers: they would receive the current stack frame
        class Prog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
        buf = ctypes.create_string_buffer(guard, len(guard))
        prog = Prog(len(guard) // 8, ctypes.cast(buf, ctypes.c_void_p))
        if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:
            _exit(3)
        del buf, prog, Prog
    del libc
    tokens = {k: bytes(v) + b"\n" for k, v in job["tokens"].items()}
    try:
        tests = _compile(job["tests"], "<tests>", "exec")
    except _BaseException:
        _write(rep, tokens["errors"])
        _exit(0)
    allow_ctypes = bool(job["allow_ctypes_import"])
    del job
    for name in ("math", "operator", "functools", "itertools", "collections", "re", "string",
                 "heapq", "bisect"):
        __import__(name)
    _AssertionError, _type, _callable, _isinstance = AssertionError, type, callable, isinstance
    _get, _modules, _fspath, _basename = dict.get, sys.modules, os.fspath, None
    import posixpath
    _basename = posixpath.basename
    _gettrace, _getprofile = sys.gettrace, sys.getprofile
    immutable = 1 << 8  # Py_TPFLAGS_IMMUTABLETYPE
    snapshot = []
    for mod_name, module in list(_modules.items()):
        namespace = getattr(module, "__dict__", None)
        if not _isinstance(namespace, dict):
            continue
        items = [(k, v) for k, v in namespace.items() if _callable(v)]
        classes = []
        for _, v in items:
            if _isinstance(v, type) and not v.__flags__ & immutable:
                classes.append((v, [(k, w) for k, w in v.__dict__.items() if _callable(w)]))
        snapshot.append((mod_name, module, namespace, items, classes))
    missing = object()

    def intact():
        if _gettrace() is not None or _getprofile() is not None:
            return False
        for mod_name, module, namespace, items, classes in snapshot:
            if _get(_modules, mod_name) is not module:
                return False
            for k, v in items:
                if _get(namespace, k, missing) is not v:
                    return False
            for cls, members in classes:
                current = cls.__dict__
                for k, v in members:
                    if current.get(k, missing) is not v:
                        return False
        return True

    builtin_names = frozenset(builtins.__dict__)
    frame_attrs = frozenset(("tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back"))
    value_errors = frozenset(("sys._getframe", "sys._getframemodulename"))
    denied = frozenset(("sys._current_frames", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
                        "sys.settrace", "sys.setprofile", "sys._settraceallthreads",
                        "sys._setprofileallthreads", "sys.monitoring.register_callback",
                        "sys.addaudithook", "cpython._PySys_ClearAuditHooks"))

    def named_mem(path):
        if _isinstance(path, int):
            return False
        name = _basename(_fspath(path))
        return name in ("mem", b"mem")

    def hook(event, args):
        if event in value_errors:
            raise ValueError("the call stack is not available in assert-style tests")
        if event in denied:
            raise PermissionError("sandbox: %s is not available in assert-style tests" % event)
        if event == "object.__getattr__":
            if args[1] in frame_attrs:
                raise AttributeError("sandbox: frames are not available in assert-style tests")
        elif event.startswith("ctypes."):
            if not (event == "ctypes.dlopen" and args[0] is None and allow_ctypes):
                raise PermissionError("sandbox: ctypes is not available in assert-style tests")
        elif event == "open":
            if named_mem(args[0]):
                raise PermissionError("sandbox: process memory is not readable in assert-style tests")
        elif event == "os.symlink":
            if named_mem(args[0]):
                raise PermissionError("sandbox: process memory is not readable in assert-style tests")

    def run(compiled, scope):  # the outcome of an exception, None when it ran to the end
        try:
            _exec(compiled, scope)
        except _AssertionError:
            return "failed"
        except _MemoryError:
            return "crashes"
        except _BaseException:
            return "errors"
        return None

    sys.addaudithook(hook)
    namespace = {"__name__": "solution", "__builtins__": builtins}
    outcome = run(code, namespace)
    if outcome is None and not intact():
        outcome = "tampered"
    if outcome is None:
        scope = {k: v for k, v in namespace.items() if k not in builtin_names}
        scope["__builtins__"] = builtins
        scope["__name__"] = "solution"
        outcome = run(tests, scope) or "passed"
        if not intact():
            outcome = "tampered"
    _write(rep, tokens[outcome])
    _exit(0)

_rlctl_harness()
'''
