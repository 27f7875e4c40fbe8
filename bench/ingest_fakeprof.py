#!/usr/bin/python3
"""Where the fake Salesforce spends its time serving the backfill listing (stdlib only).

  /usr/bin/python3 bench/ingest_fakeprof.py [--records 100000] [--top 25]

Starts test/fake_salesforce.py (with bench/ingest.py's fake_args(N)) in a child process
with cProfile around every request handler, reads the whole Contact listing twice with
bench/ingest.py's client (cold: the fake's caches empty; then warm, as sync finds them after
ingest.py's warm-up read), and prints each pass's rate and the fake's top functions by
cumulative and by own time. No cluster needed.
"""

import argparse
import cProfile
import importlib.util
import io
import os
import pstats
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import ingest  # noqa: E402


def serve(args):
    sys.path.insert(0, os.path.dirname(os.path.abspath(args.fake_script)))     # its fakelib.py
    spec = importlib.util.spec_from_file_location("fake_salesforce", args.fake_script)
    fs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fs)
    state = {"prof": cProfile.Profile(), "n": 0}
    orig = fs.Handler.handle

    def handle(self):
        prof = state["prof"]
        prof.enable()
        try:
            orig(self)
        finally:
            prof.disable()
    fs.Handler.handle = handle

    def dump(signum, frame):
        state["n"] += 1
        state["prof"].dump_stats(f"{args.stats}.{state['n']}")
        state["prof"] = cProfile.Profile()
    signal.signal(signal.SIGUSR1, dump)
    fs.main(["--port", "0"] + ingest.fake_args(args.records))


def report(path, top, label):
    out = io.StringIO()
    st = pstats.Stats(path, stream=out)
    st.strip_dirs().sort_stats("cumulative").print_stats(top)
    st.sort_stats("tottime").print_stats(top)
    print(f"===== the fake's profile, {label} pass")
    print(out.getvalue())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=100000)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--fake-script", default=os.path.join(HERE, "..", "test", "fake_salesforce.py"))
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stats", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args)
        return
    stats = f"/tmp/ingest_fakeprof.{os.getpid()}"
    out = open(stats + ".out", "w+")
    p = subprocess.Popen([sys.executable, __file__, "--serve", "--records", str(args.records),
                          "--fake-script", args.fake_script, "--stats", stats], stdout=out)
    try:
        deadline = time.time() + 600
        port = None
        while port is None and time.time() < deadline:
            out.seek(0)
            text = out.read()
            if "listening on" in text:
                port = int(text.split("listening on")[1].split()[0])
            elif p.poll() is not None:
                raise RuntimeError("the fake exited")
            else:
                time.sleep(0.2)

        class F:
            pass
        fake = F()
        fake.port, fake.pid = port, p.pid
        c = ingest.Client(fake)
        soql = f"SELECT {','.join(c.rest_fields(c.describe('Contact')))} FROM Contact ORDER BY SystemModstamp, Id"
        c.conn.close()
        os.kill(p.pid, signal.SIGUSR1)          # drop the token/describe profile
        time.sleep(0.5)
        for label in ("cold", "warm"):
            ingest.fake_alone(fake, args.records, soql, label)
            os.kill(p.pid, signal.SIGUSR1)
            time.sleep(1)
        for i, label in ((2, "cold"), (3, "warm")):
            report(f"{stats}.{i}", args.top, label)
    finally:
        p.terminate()
        p.wait()
        out.close()
        for f in (stats + ".out", stats + ".1", stats + ".2", stats + ".3"):
            if os.path.exists(f):
                os.unlink(f)


if __name__ == "__main__":
    main()
