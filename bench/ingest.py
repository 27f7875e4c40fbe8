#!/usr/bin/python3
"""Ingest benchmark of sync against the fake Salesforce (stdlib only).

Run by bench/ingest.sh, which starts a cluster; usable on its own (as the cluster's
user, who must be a superuser and own --workdir):
  /usr/bin/python3 bench/ingest.py --host SOCKETDIR --port PGPORT --fake-script test/fake_salesforce.py
      [--records "100000 1000000"] [--updates K] [--workdir DIR]

For each N (records of the fake's Contact: 44 typed fields sync selects), with a fake started
by fake_args(N): --records N, no rate limits, a large daily allocation, --render-cache N (its
query caches hold all N records) and --query-gzip-level 6 (zlib's default level, which Java's
GZIPOutputStream and Apache's mod_deflate use; at the fake's default level 1 the pages inflate
~1.5x slower, in sync as in the client, and the client alone tops out near 200,000 rec/s):
  1. fake alone: a plain HTTP client (http.client, one keep-alive connection, Accept-Encoding
     gzip like libcurl) reads the listing the way the extension does. REST: token, the SOQL
     query of every field sync selects (describe: all but deprecatedAndHidden, IsDeleted,
     base64) ORDER BY SystemModstamp, Id with Sforce-Query-Options: batchSize=2000, then every
     nextRecordsUrl; every body is gunzipped piece by piece (128 KB at a time; libcurl too
     inflates into its write callback in pieces) and its records counted, not parsed; the next page is asked for as soon
     as its URL is gunzipped, so the fake prepares it while the client gunzips the rest of the
     page (the rate is the slower of the two, not their sum). The listing is read twice: an
     untimed warm-up read fills the fake's caches (the query's order, each page's JSON and its
     pre-compressed gzip piece), then the warm read is timed and reported, with the records
     per fake CPU second: the state sync reads in, since the warm-up leaves it so. WARNING
     (after the tables) when the warm read is not well above COPY: under 2x COPY's rate (the
     client's own gunzip bounds it, ~300,000 rec/s on an idle 2-core box) or under 3x per fake
     CPU second. Bulk: a Bulk API 2.0 query job (the SELECT list sync's job uses: compound fields
     replaced by their components), polled every 50 ms, then every CSV result set of
     --bulk-chunk rows (WARNING under 3x COPY's rate);
  2. sync backfill, per path, in a fresh database bench_N_PATH: a source with
     requests_per_second 1000, batch_size 2000, bulk_threshold 0 (rest) or 1 (bulk); timed
     from the commit of add_collection('acme', 'Contact') to sync.status.backfill_completed_at;
     meanwhile every 0.5 s the worker's RssAnon/RssShmem/VmHWM (/proc/PID/status); CPU time of
     the worker, the fake, the other Postgres processes and the machine over the backfill, and
     the worker's run-queue wait (/proc/PID/schedstat). The query sync sent is checked against
     the fake-alone client's (warning if they differ);
  3. COPY (in the last path's database): the synced table is exported (COPY TO a file, text),
     an identical table (LIKE ... INCLUDING ALL) is loaded from it with COPY FROM (the source
     paused, CHECKPOINT first), timed in the same psql session, with its backend's CPU time;
  4. incremental (same database): POST /__admin/bulk_update/Contact {count: K, fields: {Title}}
     (one shared SystemModstamp); timed from the fake's answer until the greatest changed id
     has the new Title (checked every 0.1 s; pages apply in (SystemModstamp, Id) order), then
     checked for all K: K / time = changes/s.
Prints the tables (stdout) and detail lines (stderr). --perf: perf record of the worker during
each backfill, its hottest functions on stderr. Debugging: INGEST_DEBUG=1 lists the fake's
request log of each backfill; INGEST_PERF_KEEP=DIR keeps the perf data files there.
"""

import argparse
import gzip
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import zlib

TICKS = os.sysconf("SC_CLK_TCK")
CREDS = {"client_id": "test-client", "client_secret": "test-secret", "refresh_token": "test-refresh"}
API = "66.0"        # sync's default api_version


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class Psql:
    """One psql process kept open: a query costs a round trip, not a connection."""

    def __init__(self, args):
        self.p = subprocess.Popen(args + ["-XAtq", "-v", "ON_ERROR_STOP=1", "-f", "-"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, bufsize=1)
        self.n = 0

    def query(self, sql):
        self.n += 1
        tag = f"__ingest_bench_{self.n}__"
        self.p.stdin.write(f"{sql};\n\\echo {tag}\n")
        self.p.stdin.flush()
        lines = []
        while True:
            line = self.p.stdout.readline()
            if line == "":
                raise RuntimeError(f"psql ended on <{sql[:200]}>: {self.p.stderr.read()}")
            line = line.rstrip("\n")
            if line == tag:
                return lines
            lines.append(line)

    def value(self, sql):
        rows = self.query(sql)
        return rows[0] if rows else None

    def close(self):
        try:
            self.p.stdin.write("\\q\n")
            self.p.stdin.flush()
            self.p.wait(timeout=30)
        except Exception:
            self.p.kill()


def lit(s):
    return "'" + str(s).replace("'", "''") + "'"


# -- /proc ---------------------------------------------------------------------------

def cpu_ticks(pid):
    """utime + stime of a process, in clock ticks (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return None


def schedstat(pid):
    """(seconds on a CPU, seconds waiting in a run queue) of a process."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            on, wait = f.read().split()[:2]
        return int(on) / 1e9, int(wait) / 1e9
    except (OSError, ValueError):
        return None


def ppid_of(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def children_ticks(parent, exclude):
    """Summed CPU ticks of parent and its direct children except `exclude`, by pid."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) in exclude:
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(d) == parent or int(rest[1]) == parent:
            out[int(d)] = int(rest[11]) + int(rest[12])
    return out


def machine_ticks():
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    total = sum(v[:8])
    return total - idle, total


def mem_kb(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmHWM", "VmRSS", "RssAnon", "RssShmem", "RssFile"):
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


class CpuWatch:
    """CPU use of named processes and of the machine between start() and stop()."""

    def __init__(self, pids, postmaster=None, exclude=()):
        self.pids = pids            # name -> pid
        self.postmaster = postmaster
        self.exclude = set(exclude) | set(pids.values())

    def snap(self):
        s = {"t": time.time(), "machine": machine_ticks()}
        for name, pid in self.pids.items():
            s[name] = cpu_ticks(pid)
            s[name + "_sched"] = schedstat(pid)     # the main thread only (the fake: not its handlers)
        if self.postmaster:
            s["pg_other"] = children_ticks(self.postmaster, self.exclude)
        return s

    def start(self):
        self.a = self.snap()

    def stop(self):
        b = self.snap()
        wall = b["t"] - self.a["t"]
        res = {"wall": wall}
        for name in self.pids:
            if self.a[name] is not None and b[name] is not None:
                res[name] = 100.0 * (b[name] - self.a[name]) / TICKS / wall
            sa, sb = self.a[name + "_sched"], b[name + "_sched"]
            if sa and sb:
                res[name + "_oncpu_s"] = sb[0] - sa[0]
                res[name + "_runqueue_s"] = sb[1] - sa[1]
        if self.postmaster:
            # backends that came and went in between are not counted: a lower bound
            res["pg_other"] = 100.0 * sum(v - self.a["pg_other"].get(pid, 0)
                                          for pid, v in b["pg_other"].items()) / TICKS / wall
        busy = b["machine"][0] - self.a["machine"][0]
        total = b["machine"][1] - self.a["machine"][1]
        res["machine"] = 100.0 * os.cpu_count() * busy / total if total else float("nan")
        return res


# -- the fake ---------------------------------------------------------------------------

def fake_args(n):
    """The fake's options for N records (also bench/ingest_fakeprof.py's)."""
    return ["--records", str(n), "--render-cache", str(max(n, 300000)), "--query-gzip-level", "6",
            "--daily-limit", "1000000000"]


class Fake:
    def __init__(self, script, n, workdir):
        self.out = open(os.path.join(workdir, f"fake_{n}.out"), "w+")
        self.err = open(os.path.join(workdir, f"fake_{n}.log"), "w")
        t0 = time.time()
        self.p = subprocess.Popen([sys.executable, script, "--port", "0"] + fake_args(n),
                                  stdout=self.out, stderr=self.err)
        with open(os.path.join(workdir, f"fake_{n}.pid"), "w") as f:
            f.write(str(self.p.pid))
        deadline = time.time() + 600
        port = None
        while time.time() < deadline and port is None:
            if self.p.poll() is not None:
                raise RuntimeError(f"the fake Salesforce exited: see {self.err.name}")
            self.out.seek(0)
            m = re.search(r"listening on (\d+)", self.out.read())
            if m:
                port = int(m.group(1))
            else:
                time.sleep(0.2)
        if port is None:
            raise RuntimeError("the fake Salesforce did not start within 600 s")
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.pid = self.p.pid
        log(f"N={n}: fake seeded in {time.time() - t0:.1f} s (pid {self.pid}, "
            f"RSS {mem_kb(self.pid).get('VmRSS', 0) / 1024:.0f} MB)")

    def admin(self, method, path, body=None, timeout=600):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.url}/__admin/{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"null")

    def stop(self):
        self.p.terminate()
        try:
            self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        self.out.close()
        self.err.close()


class Client:
    """A plain keep-alive HTTP client speaking to the fake the way sync's libcurl does."""

    def __init__(self, fake):
        self.conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=600)
        body = urllib.parse.urlencode({"grant_type": "refresh_token", **CREDS, "format": "json"})
        tok = self.call("POST", "/services/oauth2/token", body,
                        {"Content-Type": "application/x-www-form-urlencoded"})
        tok = json.loads(tok)
        self.token = tok["access_token"]
        self.instance = urllib.parse.urlsplit(tok["instance_url"])

    def call(self, method, path, body=None, headers=None, want_headers=False):
        h = {"Accept-Encoding": "deflate, gzip", "Accept": "*/*"}
        h.update(headers or {})
        if getattr(self, "token", None):
            h["Authorization"] = "Bearer " + self.token
        self.conn.request(method, path, body=body, headers=h)
        r = self.conn.getresponse()
        data = r.read()
        if r.getheader("Content-Encoding") == "gzip":
            data = gzip.decompress(data)
        if r.status != 200:
            raise RuntimeError(f"{method} {path[:120]}: {r.status} {data[:300]!r}")
        return (data, r) if want_headers else data

    def describe(self, obj):
        return json.loads(self.call("GET", f"/services/data/v{API}/sobjects/{obj}/describe/"))["fields"]

    @staticmethod
    def rest_fields(described):
        """The fields sync selects (salesforce.c: sf_describe)."""
        return [f["name"] for f in described
                if not f.get("deprecatedAndHidden") and f["name"] != "IsDeleted" and f["type"] != "base64"]

    @staticmethod
    def bulk_fields(described):
        """The Bulk job's SELECT list (salesforce_bulk.c: bulk_field_list): compound fields
        (address, location) are replaced by their components."""
        types = {f["name"]: f["type"] for f in described}
        names = [n for n in Client.rest_fields(described) if types[n] not in ("address", "location")]
        for n in Client.rest_fields(described):
            parts = {"address": ADDRESS_PARTS, "location": ("Latitude", "Longitude")}.get(types[n])
            if parts:
                base = n[:-len("Address")] if n.endswith("Address") else n[:-len("__c")] + "__"
                names += [base + p + ("__s" if n.endswith("__c") else "") for p in parts
                          if base + p not in names]
        return names

    def send_request(self, method, path, headers=None):
        h = {"Accept-Encoding": "deflate, gzip", "Accept": "*/*", "Authorization": "Bearer " + self.token}
        h.update(headers or {})
        self.conn.request(method, path, headers=h)

    def read_listing(self, soql):
        """Every page of the query; returns (records, pages, bytes after gunzip). Once a page's
        body is in and its head (nextRecordsUrl) gunzipped, the next page is asked for, and the
        rest of the page is gunzipped and counted while the fake prepares that one."""
        opts = {"Sforce-Query-Options": "batchSize=2000"}
        path = f"/services/data/v{API}/query/?q=" + urllib.parse.quote(soql, safe="")
        self.send_request("GET", path, opts)
        records = pages = nbytes = 0
        while path:
            r = self.conn.getresponse()
            body = r.read()
            if r.status != 200:
                if r.getheader("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                raise RuntimeError(f"GET {path[:120]}: {r.status} {body[:300]!r}")
            pages += 1
            path = None

            def ask_next(head):
                nonlocal path
                m = re.search(rb'"nextRecordsUrl":"([^"]+)"', head)
                if m:
                    path = m.group(1).decode()
                    self.send_request("GET", path, opts)
            n, size = count_records(body, r.getheader("Content-Encoding") == "gzip", ask_next)
            records += n
            nbytes += size
        return records, pages, nbytes

    def read_bulk(self, soql, chunk):
        """A Bulk API 2.0 query job: create, poll every 50 ms, read every result set of `chunk`
        rows. Returns (records, sets, bytes after gunzip, seconds until JobComplete)."""
        base = f"/services/data/v{API}/jobs/query"
        t0 = time.time()
        spec = {"operation": "query", "query": soql, "contentType": "CSV", "columnDelimiter": "COMMA",
                "lineEnding": "LF"}
        job = json.loads(self.call("POST", base, json.dumps(spec), {"Content-Type": "application/json"}))["id"]
        while True:
            state = json.loads(self.call("GET", f"{base}/{job}"))["state"]
            if state == "JobComplete":
                break
            if state in ("Failed", "Aborted"):
                raise RuntimeError(f"Bulk job {job} ended {state}")
            time.sleep(0.05)
        t_complete = time.time() - t0
        records = sets = nbytes = 0
        locator = None
        while True:
            q = f"?maxRecords={chunk}" + (f"&locator={locator}" if locator else "")
            data, r = self.call("GET", f"{base}/{job}/results{q}", want_headers=True)
            sets += 1
            nbytes += len(data)
            records += int(r.getheader("Sforce-NumberOfRecords"))
            locator = r.getheader("Sforce-Locator")
            if not locator or locator == "null":
                break
        return records, sets, nbytes, t_complete


RECORD_MARK = b'{"attributes":'
GUNZIP_PIECE = 131072   # bytes of JSON per inflate step (measured fastest: 64 KB and 256 KB cost more)


def count_records(body, gzipped, on_head):
    """(records, bytes) of a query page, gunzipped piece by piece (a whole 3 MB page inflated at
    once costs more in fresh memory than in inflating); on_head(its first 400 bytes) is called
    as soon as they are known. Records are counted by their '{"attributes":' (which no value
    holds: the fake's JSON of a record starts so). zlib checks the gzip member's CRC and size;
    it must end where the body does."""
    if not gzipped:
        on_head(body[:400])
        return body.count(RECORD_MARK), len(body)
    d = zlib.decompressobj(31)
    keep = len(RECORD_MARK) - 1
    n = size = 0
    head = tail = b""
    buf = body
    while not d.eof:
        out = d.decompress(buf, GUNZIP_PIECE)
        buf = d.unconsumed_tail
        if not out:
            break
        n += out.count(RECORD_MARK)
        if tail:                        # a mark across the boundary (marks cannot overlap)
            n += (tail + out[:keep]).count(RECORD_MARK)
        tail = out[-keep:]
        if head is not None:
            head += out[:400 - len(head)]
            if len(head) >= 400:
                on_head(head)
                head = None
        size += len(out)
    if head is not None:
        on_head(head)
    if not d.eof or d.unused_data:
        raise RuntimeError(f"a gzip page that does not end where its body does ({len(body)} bytes)")
    return n, size


ADDRESS_PARTS = ("Street", "City", "State", "PostalCode", "Country", "Latitude", "Longitude", "GeocodeAccuracy")


def fake_alone(fake, n, soql, label, bulk_chunk=None, quiet=False):
    client = Client(fake)
    watch = CpuWatch({"fake": fake.pid, "client": os.getpid()})
    watch.start()
    t0 = time.time()
    if bulk_chunk:
        records, pages, nbytes, t_complete = client.read_bulk(soql, bulk_chunk)
    else:
        records, pages, nbytes = client.read_listing(soql)
    dt = time.time() - t0
    cpu = watch.stop()
    client.conn.close()
    if records != n:
        raise RuntimeError(f"fake alone ({label}): read {records} records, expected {n}")
    if quiet:
        return records / dt, cpu
    what = (f"job complete after {t_complete:.2f} s, then {pages} result sets, {nbytes / 1e6:.0f} MB CSV "
            f"in {dt - t_complete:.2f} s" if bulk_chunk else f"{pages} pages, {nbytes / 1e6:.0f} MB JSON")
    log(f"N={n}: fake alone ({label}): {records} records, {what}; {dt:.2f} s in all = {records / dt:,.0f} rec/s; "
        f"CPU: fake {cpu['fake']:.0f}% ({records / (cpu['fake'] * dt / 100):,.0f} records per fake CPU second), "
        f"client {cpu['client']:.0f}%, machine {cpu['machine']:.0f}% of {os.cpu_count() * 100}%")
    return records / dt, cpu


# -- the run ------------------------------------------------------------------------------

def wait_value(db, sql, timeout, what, interval=0.25, must=True):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = db.value(sql)
        if v not in (None, ""):
            return v
        time.sleep(interval)
    if not must:
        return None
    raise RuntimeError(f"timed out ({timeout:.0f} s) waiting for {what}: "
                       + " / ".join(db.query("SELECT collection, state, phase, backfill_records, last_error "
                                             "FROM sync.status")))


def start_perf(args, pid, tag):
    """perf record of the worker during the backfill (--perf), or None."""
    if not args.perf:
        return None
    if not shutil.which("perf"):
        log(f"{tag}: perf is not installed: no profile")
        return None
    out = os.path.join(args.workdir, f"perf_{tag.replace('=', '').replace(' ', '_')}.data")
    p = subprocess.Popen(["perf", "record", "-F", "499", "--call-graph", "dwarf,16384", "-p", str(pid), "-o", out],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    return p, out


def stop_perf(perf, args, tag):
    if perf is None:
        return
    p, out = perf
    p.send_signal(signal.SIGINT)
    p.wait(timeout=120)
    def report(*opts, limit=None):
        r = subprocess.run(["perf", "report", "-f", "-i", out, "--stdio", "-g", "none", *opts],
                           capture_output=True, text=True)
        keep = [ln.rstrip() for ln in r.stdout.splitlines()
                if ln.strip() and not ln.startswith("#") and "[.] 0x" not in ln]
        return "\n".join(keep[:limit])
    log(f"{tag}: perf profile of the worker during the backfill, by object file (self time):\n"
        + report("--no-children", "--sort", "dso"))
    log(f"{tag}: inclusive time (children) of named functions >= 2% (Debian's postgres has no symbols "
        "for static functions: those are left out):\n"
        + report("--children", "--sort", "dso,symbol", "--percent-limit", "2", limit=70))
    log(f"{tag}: self time >= 0.7%:\n" + report("--no-children", "--sort", "dso,symbol",
                                                 "--percent-limit", "0.7", limit=40))
    if os.environ.get("INGEST_PERF_KEEP"):
        subprocess.run(["cp", out, os.environ["INGEST_PERF_KEEP"]])
    os.unlink(out)


def run(args, psql_base, n, k):
    fake = Fake(args.fake_script, n, args.workdir)
    try:
        return measure(args, psql_base, fake, n, k)
    finally:
        fake.stop()


def request_kinds(reqs):
    kinds = {}
    for e in reqs:
        p = e["path"].rstrip("/")
        k = ("token" if p.endswith("/oauth2/token") else
             "describe" if p.endswith("/describe") else
             "bulk create" if e["method"] == "POST" and p.endswith("/jobs/query") else
             "bulk results" if p.endswith("/results") else
             "bulk state" if "/jobs/query/" in p else
             "query" if p.endswith("/query") else
             "queryAll" if p.endswith("/queryAll") else
             "nextRecordsUrl" if "/query/" in p or "/queryAll/" in p else p)
        kinds[k] = kinds.get(k, 0) + 1
    return kinds


def measure(args, psql_base, fake, n, k):
    out = {"n": n, "k": k, "paths": {}}
    c = Client(fake)
    described = c.describe("Contact")
    c.conn.close()
    rest_soql = f"SELECT {','.join(Client.rest_fields(described))} FROM Contact ORDER BY SystemModstamp, Id"
    bulk_soql = f"SELECT {','.join(Client.bulk_fields(described))} FROM Contact"
    # 1. the fake alone. Its caches (--render-cache N: all N records) are empty at first: an
    # untimed warm-up read fills them; the warm read, timed, finds them as sync's will.
    fake_rate, fake_cpu_rate = {}, {}
    if "rest" in args.paths:
        t0 = time.time()
        fake_alone(fake, n, rest_soql, "REST warm-up", quiet=True)
        log(f"N={n}: fake alone: REST warm-up read done (fills the fake's caches; not timed for the "
            f"figure) in {time.time() - t0:.0f} s; fake RSS {mem_kb(fake.pid).get('VmRSS', 0) / 1024:.0f} MB")
        fake_rate["rest"], cpu = fake_alone(fake, n, rest_soql, "REST, warm read: the state sync reads in")
        fake_cpu_rate["rest"] = fake_rate["rest"] * 100 / max(cpu["fake"], 0.1)
    if "bulk" in args.paths:
        fake_rate["bulk"], cpu = fake_alone(fake, n, bulk_soql, "Bulk API job", bulk_chunk=args.bulk_chunk)
        fake_cpu_rate["bulk"] = fake_rate["bulk"] * 100 / max(cpu["fake"], 0.1)

    admin_db = Psql(psql_base + ["-d", args.dbname])
    try:
        for idx, path in enumerate(args.paths):
            dbname = f"bench_{n}_{path}"
            admin_db.query(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")
            admin_db.query(f"CREATE DATABASE {dbname}")
            db = Psql(psql_base + ["-d", dbname])
            try:
                r = backfill(args, db, fake, n, path, rest_soql if path == "rest" else bulk_soql)
                r["fake"] = fake_rate[path]
                r["fake_per_cpu_s"] = fake_cpu_rate[path]
                out["paths"][path] = r
                if idx == len(args.paths) - 1:
                    copy_rows(args, db, n, r, out)
                    incremental(db, fake, n, k, r, out)
                # No sync.drop_source() here: while the worker applies a page it deadlocks with
                # the worker (see bench/README.md); the database goes, worker and all.
            finally:
                db.close()
            admin_db.query(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")
    finally:
        admin_db.close()
    for path, r in out["paths"].items():
        r["ratio"] = r["sync"] / out["copy"]
        log(f"N={n}: sync/COPY ({path}) = {r['ratio']:.3f}")
    return out


def backfill(args, db, fake, n, path, soql):
    """Backfill of Contact by sync, measured; returns the figures."""
    res = {"path": path}
    tag = f"N={n} {path}"
    db.query("CREATE EXTENSION sync")
    opts = {"requests_per_second": 1000, "batch_size": 2000, "bulk_chunk_records": args.bulk_chunk,
            "bulk_threshold": 0 if path == "rest" else 1}
    db.query(f"SELECT sync.create_source('acme', 'salesforce', {lit(fake.url)}, {lit(json.dumps(CREDS))}, "
             f"{lit(json.dumps(opts))})")
    db.query("CHECKPOINT")
    fake.admin("DELETE", "requests")
    # the worker usually starts with the source; else with the collection
    worker = wait_value(db, "SELECT sync.worker_pid()", 30, "the sync worker", 0.05, must=False)
    table = None
    if worker is None:
        table = db.value("SELECT sync.add_collection('acme', 'Contact')")
        t_commit = time.time()
        worker = wait_value(db, "SELECT sync.worker_pid()", 60, "the sync worker", 0.05)
    worker = int(worker)
    postmaster = ppid_of(worker)
    res.update(worker=worker, postmaster=postmaster)
    watch = CpuWatch({"worker": worker, "fake": fake.pid}, postmaster)
    perf = start_perf(args, worker, tag)
    watch.start()
    if table is None:
        table = db.value("SELECT sync.add_collection('acme', 'Contact')")
        t_commit = time.time()
    res["table"] = table
    peak = {}
    done = None
    deadline = time.time() + max(900, n / 100)
    while time.time() < deadline:
        for key, v in mem_kb(worker).items():
            peak[key] = max(peak.get(key, 0), v)
        done = db.value("SELECT extract(epoch FROM backfill_completed_at) || '|' || "
                        "extract(epoch FROM backfill_started_at) FROM sync.status "
                        "WHERE source = 'acme' AND backfill_completed_at IS NOT NULL")
        if done:
            break
        time.sleep(0.5)
    if not done:
        raise RuntimeError("backfill not done: " + " / ".join(db.query(
            "SELECT state, phase, backfill_records, backfill_total, last_error FROM sync.status")))
    cpu = watch.stop()
    stop_perf(perf, args, tag)
    m = mem_kb(worker)
    for key, v in m.items():
        peak[key] = max(peak.get(key, 0), v)
    res["hwm_end"] = m.get("VmHWM", 0)
    res["peak"] = peak
    res["cpu"] = cpu
    res["worker_cpu_s"] = cpu["worker"] * cpu["wall"] / 100
    res["fake_cpu_s"] = cpu["fake"] * cpu["wall"] / 100
    t_done, t_started = (float(x) for x in done.split("|"))
    rows = int(db.value(f"SELECT count(*) FROM {table}"))
    if rows != n:
        raise RuntimeError(f"{table} holds {rows} rows after the backfill, the fake {n}")
    res["sync_s"] = t_done - t_commit
    res["sync"] = n / res["sync_s"]
    status = db.value("SELECT requests || ' requests, ' || records_upserted || ' upserted' "
                      "FROM sync.status WHERE source = 'acme'")
    reqs = sorted(fake.admin("GET", "requests"), key=lambda e: e["t"])
    kinds = request_kinds(reqs)
    # the query sync sent must be the one the fake-alone client read
    if path == "rest":
        sent = [urllib.parse.parse_qs(e["query"]).get("q", [""])[0] for e in reqs
                if e["path"].rstrip("/").endswith("/query") and e["query"]]
    else:
        sent = [j["query"] for j in fake.admin("GET", "bulk")["jobs"]]
    if soql not in sent:
        log(f"{tag}: WARNING: sync's backfill query differs from the fake-alone client's: {sent[-1:]}")
    if path == "bulk" and not kinds.get("bulk create"):
        log(f"{tag}: WARNING: this sync made no Bulk API job (bulk_threshold not supported?): "
            "the bulk row measures REST pages")
    res["kinds"] = kinds
    if os.environ.get("INGEST_DEBUG"):
        for e in reqs:
            log(f"  {e['t']:.3f} {e['method']} {e['path']} {urllib.parse.unquote(e['query'])[-160:]} {e['status']}")
    log(f"{tag}: sync backfill: {n} rows in {res['sync_s']:.1f} s from the add_collection commit "
        f"({t_done - t_started:.1f} s from backfill_started_at) = {res['sync']:,.0f} rec/s; sync.status: {status}; "
        f"the fake saw {len(reqs)} requests ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))})")
    log(f"{tag}: CPU during the backfill: worker {res['worker_cpu_s']:.1f} s = {cpu['worker']:.0f}% "
        f"({n / res['worker_cpu_s']:,.0f} records per worker CPU second), fake {res['fake_cpu_s']:.1f} s = "
        f"{cpu['fake']:.0f}%, other Postgres processes {cpu['pg_other']:.0f}%, machine {cpu['machine']:.0f}% of "
        f"{os.cpu_count() * 100}%")
    if "worker_oncpu_s" in cpu:
        res["worker_runqueue_s"] = cpu["worker_runqueue_s"]
        log(f"{tag}: the worker's {cpu['wall']:.1f} s: {cpu['worker_oncpu_s']:.1f} s on a CPU, "
            f"{cpu['worker_runqueue_s']:.1f} s runnable but waiting for a CPU (other work), "
            f"{cpu['wall'] - cpu['worker_oncpu_s'] - cpu['worker_runqueue_s']:.1f} s blocked (HTTP answers, "
            f"I/O, locks)")
    log(f"{tag}: worker memory: VmHWM {res['hwm_end'] / 1024:.0f} MB at the end; sampled peaks: "
        f"RssAnon {peak.get('RssAnon', 0) / 1024:.1f} MB, RssShmem {peak.get('RssShmem', 0) / 1024:.0f} MB, "
        f"RssFile {peak.get('RssFile', 0) / 1024:.0f} MB")
    return res


def copy_rows(args, db, n, r, out):
    """COPY the synced rows into an identical table (the source paused meanwhile)."""
    table = r["table"]
    db.query("SELECT sync.pause('acme')")
    path = os.path.join(args.workdir, f"contact_{n}.copy")
    t0 = time.time()
    db.query(f"COPY {table} TO {lit(path)}")
    t_export = time.time() - t0
    db.query("CREATE SCHEMA bench_copy")
    db.query(f"CREATE TABLE bench_copy.contact (LIKE {table} INCLUDING ALL)")
    db.query("CHECKPOINT")
    backend = int(db.value("SELECT pg_backend_pid()"))
    watch = CpuWatch({"backend": backend}, r["postmaster"])
    watch.start()
    t0 = time.time()
    db.query(f"COPY bench_copy.contact FROM {lit(path)}")
    out["copy_s"] = time.time() - t0
    cpu = watch.stop()
    out["copy_cpu_s"] = cpu["backend"] * cpu["wall"] / 100
    out["copy"] = n / out["copy_s"]
    size = os.path.getsize(path)
    same = db.value("SELECT count(*) FROM bench_copy.contact")
    if int(same) != n:
        raise RuntimeError(f"COPY loaded {same} rows, expected {n}")
    tsize = db.value(f"SELECT pg_size_pretty(pg_total_relation_size('{table}')) || ' / ' || "
                     "pg_size_pretty(pg_total_relation_size('bench_copy.contact'))")
    log(f"N={n}: COPY: exported {size / 1e6:.0f} MB in {t_export:.1f} s; COPY FROM {n} rows in "
        f"{out['copy_s']:.2f} s = {out['copy']:,.0f} rec/s; CPU: its backend {out['copy_cpu_s']:.1f} s "
        f"({cpu['backend']:.0f}%), other Postgres processes {cpu['pg_other']:.0f}%, machine "
        f"{cpu['machine']:.0f}%; table sizes sync / copy: {tsize}")
    os.unlink(path)
    db.query("DROP SCHEMA bench_copy CASCADE")
    t_resume = db.value("SELECT extract(epoch FROM clock_timestamp())")
    db.query("SELECT sync.resume('acme')")
    wait_value(db, f"SELECT 1 FROM sync.status WHERE source = 'acme' "
                   f"AND last_caught_up_at > to_timestamp({t_resume})", 300, "a poll after resume")


def incremental(db, fake, n, k, r, out):
    """K records changed at once in the fake, timed until the table shows them all."""
    table = r["table"]
    title_col = db.value("SELECT column_name FROM sync.columns WHERE source = 'acme' AND api_field = 'Title'")
    title = f"bench-{n}-{int(time.time())}"
    watch = CpuWatch({"worker": r["worker"], "fake": fake.pid}, r["postmaster"])
    t0 = time.time()
    ans = fake.admin("POST", "bulk_update/Contact", {"count": k, "fields": {"Title": title}})
    t_fake = time.time()
    watch.start()
    if len(ans["ids"]) != k:
        raise RuntimeError(f"bulk_update changed {len(ans['ids'])} records, asked {k}")
    # Pages are applied in (SystemModstamp, Id) order and the K records share one stamp: once
    # the greatest id shows the new value, all do (checked once after; a count(*) every tick
    # would scan the table and compete with the worker).
    last = max(ans["ids"])
    deadline = time.time() + max(600, k / 50)
    got = 0
    while time.time() < deadline:
        if db.value(f"SELECT 1 FROM {table} WHERE id = {lit(last)} AND {title_col} = {lit(title)}"):
            t_seen = time.time()
            got = int(db.value(f"SELECT count(*) FROM {table} WHERE {title_col} = {lit(title)}"))
            if got >= k:
                break
            log(f"N={n}: {last} has the new value, but only {got} of {k} records: waiting for them all")
            time.sleep(0.5)
        else:
            time.sleep(0.1)
    cpu = watch.stop()
    if got != k:
        raise RuntimeError(f"only {got} of {k} changes reached {table}")
    out["incr_s"] = t_seen - t_fake
    out["incr"] = k / out["incr_s"]
    out["incr_cpu"] = cpu
    out["incr_worker_cpu_s"] = cpu["worker"] * cpu["wall"] / 100
    log(f"N={n}: incremental: fake bulk_update of {k} records took {t_fake - t0:.1f} s; all {k} in the "
        f"table {out['incr_s']:.2f} s after its answer = {out['incr']:,.0f} changes/s; CPU: worker "
        f"{out['incr_worker_cpu_s']:.1f} s = {cpu['worker']:.0f}% ({k / out['incr_worker_cpu_s']:,.0f} changes "
        f"per worker CPU second), fake {cpu['fake']:.0f}%, other Postgres {cpu['pg_other']:.0f}%, "
        f"machine {cpu['machine']:.0f}%")
    m = mem_kb(r["worker"])
    log(f"N={n}: worker memory after the incremental: VmHWM {m.get('VmHWM', 0) / 1024:.0f} MB, "
        f"RssAnon {m.get('RssAnon', 0) / 1024:.1f} MB")


RATES = ("N", "path", "fake_alone_rps", "sync_rps", "copy_rps", "sync/copy", "worker_RssAnon_MB",
         "worker_VmHWM_MB")
CPUS = ("N", "path", "backfill_s", "worker_cpu%", "fake_cpu%", "pg_other_cpu%", "machine_cpu%", "worker_cpu_s",
        "rec/worker_cpu_s", "copy_cpu_s", "rec/copy_cpu_s", "cpu_ratio")
INCR = ("N", "K", "seconds", "changes/s", "worker_cpu%", "fake_cpu%", "machine_cpu%", "changes/worker_cpu_s")


def table(header, rows):
    widths = [max(len(h), *(len(c[i]) for c in rows)) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for cells in rows:
        print("  ".join(c.rjust(w) for c, w in zip(cells, widths)))
    print()


def report(results):
    rows = [(o, r) for o in results for r in o["paths"].values()]
    table(RATES, [[str(o["n"]), r["path"], f"{r['fake']:,.0f}", f"{r['sync']:,.0f}", f"{o['copy']:,.0f}",
                   f"{r['ratio']:.3f}", f"{r['peak'].get('RssAnon', 0) / 1024:.1f}", f"{r['hwm_end'] / 1024:.0f}"]
                  for o, r in rows])
    table(CPUS, [[str(o["n"]), r["path"], f"{r['sync_s']:.1f}", f"{r['cpu']['worker']:.0f}",
                  f"{r['cpu']['fake']:.0f}", f"{r['cpu']['pg_other']:.0f}", f"{r['cpu']['machine']:.0f}",
                  f"{r['worker_cpu_s']:.1f}", f"{o['n'] / r['worker_cpu_s']:,.0f}", f"{o['copy_cpu_s']:.2f}",
                  f"{o['n'] / o['copy_cpu_s']:,.0f}", f"{o['copy_cpu_s'] / r['worker_cpu_s']:.3f}"]
                 for o, r in rows])
    table(INCR, [[str(o["n"]), str(o["k"]), f"{o['incr_s']:.2f}", f"{o['incr']:,.0f}",
                  f"{o['incr_cpu']['worker']:.0f}", f"{o['incr_cpu']['fake']:.0f}",
                  f"{o['incr_cpu']['machine']:.0f}", f"{o['k'] / o['incr_worker_cpu_s']:,.0f}"] for o in results])
    print(f"CPU: during the backfill, % of one core (machine: every process, of {os.cpu_count() * 100}%); "
          "cpu_ratio = COPY's backend CPU s / the worker's CPU s for the same rows.")
    # "Well above COPY", REST: the warm read at least twice COPY's rate (wall clock: the Python
    # client's own gunzip bounds it, ~300,000 rec/s on an idle 2-core box, less when other work
    # takes CPU; sync gunzips the same pages) and the fake's own CPU at least three times (records
    # per fake CPU second). Bulk: 3x, as before.
    for o, r in rows:
        if r["path"] == "rest":
            low = r["fake"] < 2 * o["copy"] or r["fake_per_cpu_s"] < 3 * o["copy"]
            wanted = "2x wall, 3x per fake CPU second"
        else:
            low, wanted = r["fake"] < 3 * o["copy"], "3x"
        if low:
            print(f"WARNING N={o['n']} {r['path']}: the fake alone serves {r['fake']:,.0f} rec/s "
                  f"({r['fake_per_cpu_s']:,.0f} records per fake CPU second), not well above COPY's "
                  f"{o['copy']:,.0f} rec/s (wanted: {wanted}): sync/COPY measures the fake as much as sync "
                  "(compare rec/worker_cpu_s with rec/copy_cpu_s)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", required=True, help="Postgres socket directory or host")
    ap.add_argument("--port", required=True)
    ap.add_argument("--dbname", default="postgres", help="database to create the bench_N databases from")
    ap.add_argument("--user", default=None)
    ap.add_argument("--psql", default="psql")
    ap.add_argument("--fake-script", required=True, help="path of test/fake_salesforce.py")
    ap.add_argument("--records", default="100000 1000000", help="the Ns, space or comma separated")
    ap.add_argument("--updates", type=int, default=None,
                    help="K records changed for the incremental rate (default min(N/5, max(20000, N/20)))")
    ap.add_argument("--paths", default="rest bulk",
                    help="backfill paths to measure: rest (bulk_threshold 0: query + nextRecordsUrl pages) and/or "
                         "bulk (bulk_threshold 1: a Bulk API 2.0 query job); COPY and the incremental rate are "
                         "measured in the last one's database")
    ap.add_argument("--bulk-chunk", type=int, default=50000, help="bulk_chunk_records (maxRecords)")
    ap.add_argument("--perf", action="store_true", help="perf record the worker during each backfill and "
                                                         "print where its CPU time goes")
    ap.add_argument("--workdir", default=".", help="directory for the COPY file and the fake's logs "
                                                   "(the server must be able to write it)")
    args = ap.parse_args()
    args.paths = args.paths.replace(",", " ").split()
    if not args.paths or any(p not in ("rest", "bulk") for p in args.paths):
        ap.error("--paths: rest and/or bulk")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))     # run the finally blocks: stop the fake

    psql = [args.psql, "-h", args.host, "-p", str(args.port)]
    if args.user:
        psql += ["-U", args.user]
    results = []
    for n in [int(x) for x in args.records.replace(",", " ").split()]:
        k = args.updates or min(n // 5, max(20000, n // 20))
        started = time.time()
        with open("/proc/loadavg") as f:
            log(f"N={n}: load average before: {' '.join(f.read().split()[:3])}")
        results.append(run(args, psql, n, k))
        log(f"N={n}: measured in {time.time() - started:.0f} s")
    report(results)


if __name__ == "__main__":
    main()
