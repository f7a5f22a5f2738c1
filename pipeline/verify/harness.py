"""The two sides of a function test, each run in a sandbox of its own (stdlib only: this file is
the program the sandbox runs, on the sandbox's interpreter).

Why two processes: when the program and the test code share an interpreter, the program decides
what "pass" means. It can end the run before a failing test (`os._exit(0)`, `SystemExit`, an
`atexit` or `signal.alarm` handler), swallow the failure (`sys.excepthook`), make every comparison
true (an object whose `__eq__` always returns True), patch what the tests use (`builtins.abs`),
or read the test code from its own script. Here:

- role `serve` (the program's sandbox) loads the prelude and the program as a module named
  `solution` (not `__main__`: a trailing `unittest.main()` or `if __name__ == "__main__":` block
  does not take over; SystemExit while loading is tolerated, the tests still run), then answers
  calls. It never sees the tests.
- role `test` (the harness's sandbox, another uid and pid namespace: no signal, ptrace or
  /proc/<pid>/mem between the two) runs the test code. Each name the program defines is a proxy;
  every call crosses a pipe as plain values (None, bool, int, float, str, bytes, list, tuple,
  dict, set, frozenset) decoded by an unpickler that refuses every class, so what the tests
  compare is built here, by this interpreter, from data. Anything else the program returns (a
  class instance, a generator) stays in the program as a handle: it can be called, its attributes
  read and it can be iterated (materialised there), but comparing it or taking its truth value
  fails the test as `unsupported_value`.
- Only the harness writes the completion record, on a pipe the program has no end of, with the
  run's nonce, after the last test; the host accepts nothing else. A program that dies or exits
  mid-test (EOF on the pipe, SystemExit raised in a call) fails as `early_exit`; such failures are
  sticky: test code that catches everything cannot turn them into a pass.
"""

import builtins
import io
import json
import math
import os
import pickle
import struct
import sys
import types

PLAIN = (type(None), bool, int, float, str, bytes, bytearray, list, tuple, dict, set, frozenset)
ROUTINES = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type)
"""Handles to these are true, like the functions and classes themselves (`f = g or h` works)."""
MAX_FRAME = 16 << 20
_HEADER = struct.Struct(">I")


class Link:
    """A framed, pickled message channel over two pipe fds; handles travel as persistent ids."""

    def __init__(self, read_fd, write_fd, encode_handle, decode_handle):
        self.rfile = io.open(read_fd, "rb", buffering=0, closefd=False)
        self.wfd = write_fd
        self.encode_handle = encode_handle
        self.decode_handle = decode_handle

    def send(self, message):
        buf = io.BytesIO()
        pickler = pickle.Pickler(buf, protocol=4)
        pickler.persistent_id = self.encode_handle
        pickler.dump(message)
        data = buf.getvalue()
        if len(data) > MAX_FRAME:
            raise Unsupported("a value of %d bytes (limit %d)" % (len(data), MAX_FRAME))
        view = memoryview(_HEADER.pack(len(data)) + data)
        while view:
            view = view[os.write(self.wfd, view):]

    def receive(self):
        """The next message, or None at EOF; ProtocolError for anything malformed."""
        header = self._read(_HEADER.size)
        if header is None:
            return None
        (size,) = _HEADER.unpack(header)
        if size > MAX_FRAME:
            raise ProtocolError("frame of %d bytes" % size)
        data = self._read(size)
        if data is None:
            return None
        unpickler = _Restricted(io.BytesIO(data))
        unpickler.persistent_load = self.decode_handle
        try:
            return unpickler.load()
        except Unsupported:
            raise
        except Exception as e:
            raise ProtocolError("undecodable message: %s" % e)

    def _read(self, n):
        chunks, left = [], n
        while left:
            chunk = self.rfile.read(left)
            if not chunk:
                return None
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)


class _Restricted(pickle.Unpickler):
    """Builds only the builtin containers and scalars pickle encodes without a class lookup."""

    def find_class(self, module, name):
        raise Unsupported("a %s.%s" % (module, name))


class Unsupported(Exception):
    """A value that cannot cross between the program and the tests."""


class ProtocolError(Exception):
    """The program's side sent something that is not a well-formed answer."""


def _read_payload():
    return json.loads(sys.stdin.buffer.read())


# --- the program's side -------------------------------------------------------------------------


def serve(payload):
    """Load prelude + program as module `solution`, announce its names, answer calls until EOF."""
    handles = {}
    by_id = {}

    def encode(obj):
        if type(obj) in PLAIN:
            return None
        if type(obj) is _Handle:
            obj = obj.value
        key = id(obj)
        if key not in by_id:
            by_id[key] = len(handles)
            handles[len(handles)] = obj
        return ("h", by_id[key], type(obj).__name__, isinstance(obj, ROUTINES))

    def decode(pid):
        try:
            return handles[pid[1]]
        except (KeyError, TypeError, IndexError):
            raise ProtocolError("unknown handle %r" % (pid,))

    link = Link(payload["req_fd"], payload["resp_fd"], encode, decode)
    module = types.ModuleType("solution")
    sys.modules["solution"] = module
    sys.argv = ["solution"]
    for part, name in ((payload["prelude"], "prelude.py"), (payload["program"], "solution.py")):
        if not part:
            continue
        SOURCES[name] = part
        try:
            exec(compile(part, name, "exec"), module.__dict__)
        except SystemExit:
            pass  # a trailing unittest.main() or sys.exit(main()): the tests still run
        except BaseException as e:
            link.send(("load_error", name, _summary(e), _trace(e)))
            return
    exports, exceptions = {}, {}
    for name, value in list(module.__dict__.items()):
        if name.startswith("__") or isinstance(value, types.ModuleType):
            continue
        if isinstance(value, type) and issubclass(value, BaseException):
            exceptions[name] = _builtin_base(value).__name__
        else:
            exports[name] = _plain(value)
    try:
        link.send(("ready", exports, exceptions))
    except (Unsupported, RecursionError):  # a huge or deep global: the tests get a handle to it
        link.send(("ready", {k: v if type(v) in PLAIN[:5] else _Handle(v) for k, v in exports.items()}, exceptions))
    while True:
        try:
            request = link.receive()
        except ProtocolError as e:
            link.send((None, "protocol", str(e)))
            return
        if request is None:
            return
        answer = _answer(request)
        try:
            link.send(answer)
        except (Unsupported, RecursionError) as e:
            link.send((answer[0], "unsupported", "a value that cannot be sent (%s)" % _summary(e)))


class _Handle:
    """Sends the value it wraps as a handle even when it is plain."""

    def __init__(self, value):
        self.value = value


def _answer(request):
    seq, op, target, args = request
    try:
        if op == "call":
            value = target(*args[0], **args[1])
        elif op == "getattr":
            value = getattr(target, args)
        elif op == "iter":
            value = list(target)
        else:
            return (seq, "protocol", "unknown operation %r" % (op,))
        try:
            value = _plain(value)
        except RecursionError:
            pass  # self-referential: pickle keeps the cycle
    except BaseException as e:
        return (seq, "raise", type(e).__name__, type(e).__module__, _builtin_base(type(e)).__name__,
                _summary(e), _trace(e), not isinstance(e, Exception))
    return (seq, "ok", value)


def _plain(value):
    """dict subclasses that compare as dicts (Counter, OrderedDict, defaultdict) cross as dicts;
    everything else crosses as it is (plain) or as a handle."""
    t = type(value)
    if t in (list, tuple, set, frozenset):
        return t(_plain(v) for v in value)
    if t is not dict and isinstance(value, dict) and t.__module__ == "collections":
        return {_plain(k): _plain(v) for k, v in value.items()}
    if t is dict:
        return {_plain(k): _plain(v) for k, v in value.items()}
    return value


def _builtin_base(cls):
    return next(c for c in cls.__mro__ if c.__module__ == "builtins")


def _summary(e):
    return ("%s: %s" % (type(e).__name__, e))[:500]


SOURCES = {}  # file name -> source of what the program's side ran, for its tracebacks


def _trace(e):
    """The program's traceback, from its own first frame on (the server's frames say nothing)."""
    import linecache, traceback  # only on failure: their import costs a few ms at every start

    for name, source in SOURCES.items():
        linecache.cache[name] = (len(source), None, source.splitlines(True), name)
    tb = e.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename not in SOURCES:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(e), e, tb))[-2000:]


# --- the harness's side -----------------------------------------------------------------------------


class Abort(BaseException):
    """Ends the tests for a failure the test code must not be able to catch."""


class Harness:
    """Proxies for the program's names, the sticky failure and the remote calls."""

    def __init__(self, payload):
        self.failure = None  # (reason, details): set once, never cleared
        self.seq = 0
        self.remotes = {}
        self.exc_classes = {}
        self.program_error = (None, "")  # the last exception raised here for the program, its trace
        self.link = Link(payload["resp_fd"], payload["req_fd"], self._encode, self._decode)

    def fail(self, reason, **details):
        if self.failure is None:
            self.failure = (reason, details)
        raise Abort(reason)

    def _encode(self, obj):
        if type(obj) is Remote:
            return ("h", object.__getattribute__(obj, "_id"))
        if type(obj) in PLAIN:
            return None
        raise Unsupported("the test passes a %s" % type(obj).__name__)

    def _decode(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "h" and type(pid[1]) is int
                and type(pid[2]) is str and type(pid[3]) is bool):
            raise ProtocolError("bad handle %r" % (pid,))
        if pid[1] not in self.remotes:
            self.remotes[pid[1]] = Remote(self, pid[1], pid[2][:100], pid[3])
        return self.remotes[pid[1]]

    def receive(self):
        try:
            message = self.link.receive()
        except Unsupported as e:
            self.fail("unsupported_value", error="the program answered with %s" % e)
        except ProtocolError as e:
            self.fail("early_exit", error="the program's side broke the channel: %s" % e)
        if message is None:
            self.fail("early_exit", error="the program's process ended before the tests did")
        return message

    def request(self, op, target, args):
        if self.failure is not None:
            raise Abort(self.failure[0])
        self.seq += 1
        try:
            self.link.send((self.seq, op, target, args))
        except Unsupported as e:
            self.fail("unsupported_value", error=str(e))
        except OSError:
            self.fail("early_exit", error="the program's process ended before the tests did")
        answer = self.receive()
        if not (isinstance(answer, tuple) and len(answer) >= 2 and answer[0] == self.seq):
            self.fail("early_exit", error="the program's side answered out of turn")
        kind = answer[1]
        if kind == "ok" and len(answer) == 3:
            return answer[2]
        if kind == "raise" and len(answer) == 8 and all(type(x) is str for x in answer[2:7]):
            name, module, base, summary, trace, exiting = answer[2:]
            if exiting:
                self.fail("early_exit", error="the program raised %s during a test" % summary, trace=trace[-1000:])
            error = self.exception(name, module, base)(summary.split(": ", 1)[-1])
            self.program_error = (error, trace)
            raise error
        if kind == "unsupported" and len(answer) == 3:
            self.fail("unsupported_value", error="the program answered with %s" % (answer[2],))
        self.fail("early_exit", error="the program's side sent %r" % (answer[:2],))

    def exception(self, name, module, base):
        """The class to raise here for the program's exception: the builtin itself, or one class per
        program-defined name (derived from its nearest builtin base, so `except ValueError` works)."""
        if module == "builtins" and isinstance(getattr(builtins, name, None), type):
            return getattr(builtins, name)
        if name not in self.exc_classes:
            parent = getattr(builtins, base, Exception)
            if not (isinstance(parent, type) and issubclass(parent, Exception)):
                parent = Exception
            self.exc_classes[name] = type(name, (parent,), {"__module__": "solution"})
        return self.exc_classes[name]

    def namespace(self):
        """The test code's globals: the program's names (values, proxies, exception classes)."""
        message = self.receive()
        if message[0] == "load_error" and len(message) == 4:
            where, summary, trace = message[1:]
            if where == "prelude.py":
                self.fail("bad_tests", error="the prelude failed: %s" % summary)
            self.fail("runtime_error", error=summary, trace=trace[-1000:])
        if message[0] != "ready" or len(message) != 3 or type(message[1]) is not dict or type(message[2]) is not dict:
            self.fail("early_exit", error="the program's side did not start the protocol")
        ns = {"__name__": "__main__", "__builtins__": builtins}
        for name, value in message[1].items():
            if type(name) is str:
                ns[name] = value
        for name, base in message[2].items():
            if type(name) is str and type(base) is str:
                ns[name] = self.exception(name, "solution", base)
        return ns


class Remote:
    """Something of the program's that is not a plain value: usable, never comparable."""

    __slots__ = ("_harness", "_id", "_type", "_routine")

    def __init__(self, harness, ident, type_name, routine):
        object.__setattr__(self, "_harness", harness)
        object.__setattr__(self, "_id", ident)
        object.__setattr__(self, "_type", type_name)
        object.__setattr__(self, "_routine", routine)

    def __call__(self, *args, **kwargs):
        return object.__getattribute__(self, "_harness").request("call", self, (args, kwargs))

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return object.__getattribute__(self, "_harness").request("getattr", self, name)

    def __iter__(self):
        return iter(object.__getattribute__(self, "_harness").request("iter", self, None))

    def _unsupported(self, use):
        kind = object.__getattribute__(self, "_type")
        object.__getattribute__(self, "_harness").fail(
            "unsupported_value", error="the program returned a %s, which the test %s; only plain values "
            "(None, bool, int, float, str, bytes, list, tuple, dict, set) can be compared" % (kind, use))

    def __eq__(self, other):
        if other is self:
            return True
        self._unsupported("compares")

    def __ne__(self, other):
        return not self.__eq__(other)

    def __bool__(self):
        if object.__getattribute__(self, "_routine"):
            return True
        self._unsupported("takes the truth value of")

    def __hash__(self):
        return object.__getattribute__(self, "_id")

    def __repr__(self):
        return "<%s from the program>" % object.__getattribute__(self, "_type")


def same(got, want):
    """Strict equality for `call` tests: same type and value, recursively. A list in the expected
    output also matches a tuple (JSON has no tuples); bool is not int, int is not float."""
    if type(want) is list and type(got) in (list, tuple):
        return len(got) == len(want) and all(same(g, w) for g, w in zip(got, want))
    if type(got) is not type(want):
        return False
    if type(want) is dict:
        return got.keys() == want.keys() and all(same(got[k], want[k]) for k in want)
    if type(want) is float and math.isnan(want):
        return math.isnan(got)
    return got == want


def _excerpt(value, n=200):
    text = repr(value)
    return text if len(text) <= n else text[: n // 2] + " ... " + text[-n // 2:]


def run_tests(payload):
    """Run the tests; the record says passed only if they ran to their end with no failure."""
    harness = Harness(payload)
    tests = payload["tests"]
    record = {"nonce": payload["nonce"], "passed": False}
    try:
        ns = harness.namespace()
        if tests["kind"] == "call":
            _run_calls(harness, ns, tests)
        else:
            _run_asserts(harness, ns, tests["code"])
        if harness.failure is None:
            record["passed"] = True
    except Abort:
        pass
    except AssertionError as e:
        harness.failure = harness.failure or ("tests_failed", _assert_details(e, tests))
    except BaseException as e:
        details = {"error": _summary(e), "where": _where(e, tests)}
        if e is harness.program_error[0]:
            details["trace"] = harness.program_error[1][-1000:]
        harness.failure = harness.failure or ("runtime_error", details)
    if harness.failure is not None:
        record["reason"], record["details"] = harness.failure
    text = json.dumps(record, default=repr)
    if len(text) > 32768:  # the host reads the record after the run: stay within a pipe's buffer
        record["details"] = {"error": "details too long"}
        text = json.dumps(record)
    with io.open(payload["record_fd"], "w", closefd=True) as f:
        f.write(text)


def _run_asserts(harness, ns, code):
    try:
        compiled = compile(code, "tests.py", "exec")
    except SyntaxError as e:
        harness.fail("bad_tests", error="the test code does not compile: %s" % _summary(e))
    module = types.ModuleType("__main__")
    module.__dict__.update(ns)
    sys.modules["__main__"] = module  # unittest.main() in the test code finds its TestCases
    try:
        exec(compiled, module.__dict__)
    except SystemExit as e:  # the test code's own exit (unittest.main): its status decides
        if e.code not in (None, 0, False):
            harness.failure = harness.failure or ("tests_failed", {"error": "the test code exited with %r" % (e.code,)})


def _run_calls(harness, ns, tests):
    name = tests["fn_name"]
    fn = ns.get(name)
    if fn is None and "Solution" in ns:
        fn = getattr(ns["Solution"](), name)
    if fn is None:
        harness.fail("runtime_error", error="the program defines no %s (nor Solution.%s)" % (name, name))
    for i, case in enumerate(tests["cases"]):
        got = fn(*case["args"])
        want = case["expected"]
        if type(got) is Remote:
            got._unsupported("compares")
        if not (same(got, want) or same([got], want)):
            harness.failure = ("tests_failed", {"case": i, "args": _excerpt(case["args"]),
                                                "expected": _excerpt(want), "got": _excerpt(got)})
            return


def _assert_details(e, tests):
    details = {"where": _where(e, tests)}
    if str(e):
        details["error"] = _summary(e)
    return details


def _where(e, tests):
    """The test code's line that failed (the test code is the dataset's, not a host file)."""
    tb, line = e.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "tests.py":
            line = tb.tb_lineno
        tb = tb.tb_next
    if line is None or tests["kind"] != "assert":
        return None
    lines = tests["code"].splitlines()
    return "tests.py:%d: %s" % (line, lines[line - 1].strip()[:200] if line <= len(lines) else "")


def main():
    payload = _read_payload()
    sys.setrecursionlimit(10000)
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)
    if payload["role"] == "serve":
        serve(payload)
    else:
        run_tests(payload)


if __name__ == "__main__":
    main()
