#!/usr/bin/python3
"""Budget and lag benchmark of sync against the fake Salesforce (stdlib only).

Run by bench/lag.sh, which starts a cluster and the fake; usable on its own:
  /usr/bin/python3 bench/lag.py --fake http://127.0.0.1:PORT --host SOCKETDIR --port PGPORT
      [--budget 4] [--collections 1,5,20] [--changes 30] [--backfill-seconds 30]

For each number of collections N, on a fresh Salesforce source with requests_per_second
= budget, burst 1, batch_size 200 and N custom objects:
  1. backfill: the objects hold budget x backfill-seconds pages of 200 records in all;
     achieved requests/s = the requests the fake saw from the first backfill query to
     the last backfill page, over that time (every request of the source counts:
     polls of collections already caught up too);
  2. once every collection was caught up three polling cycles later, `changes` random
     record updates at random moments over max(6 polling cycles, 10 s); each is timed
     from the fake's answer to the PATCH until a persistent psql session, looking every
     25 ms, sees the new values;
  3. est_max_lag is read from sync.status for the changed collection just before each
     change (est_max_lag_s: their mean; max/est = lag_max_s / est_max_lag_s);
  4. sync.status.lag of every collection is sampled every 0.5 s meanwhile
     (status_lag_max_s: the largest seen).
Prints one row per N (see HEADER) and a line of detail per N on stderr.
"""

import argparse
import json
import math
import random
import subprocess
import sys
import time
import urllib.parse
import urllib.request

HEADER = ("collections", "budget_rps", "achieved_rps", "achieved/budget", "est_max_lag_s",
          "lag_p50_s", "lag_p99_s", "lag_max_s", "max/est", "status_lag_max_s")
TICK = 0.025
PAGE = 200


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
        tag = f"__lag_bench_{self.n}__"
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
            self.p.wait(timeout=10)
        except Exception:
            self.p.kill()


class Fake:
    def __init__(self, url):
        self.url = url.rstrip("/")

    def admin(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.url}/__admin/{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read() or b"null")


def quantile(values, q):
    v = sorted(values)
    if not v:
        return float("nan")
    pos = q * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def lit(s):
    return "'" + str(s).replace("'", "''") + "'"


def classify(entry):
    """(kind, object) of a request in the fake's log."""
    path = entry["path"]
    if path == "/services/oauth2/token":
        return "token", None
    parts = path.split("/")
    if len(parts) >= 5 and parts[1:3] == ["services", "data"] and parts[4] in ("query", "queryAll") \
            and len(parts) <= 6 and (len(parts) == 5 or parts[5] == ""):
        q = urllib.parse.parse_qs(entry.get("query") or "").get("q", [""])[0]
        words = q.split()
        obj = None
        for i, w in enumerate(words):
            if w.upper() == "FROM" and i + 1 < len(words):
                obj = words[i + 1]
        return parts[4], obj
    if "/query/" in path:
        return "more", None
    if path.endswith("/deleted/") or path.endswith("/deleted"):
        return "deleted", parts[-3] if path.endswith("/") else parts[-2]
    if path.endswith("/describe/") or path.endswith("/describe"):
        return "describe", None
    return "other", None


def wait_for(db, sql, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if db.value(sql) == "t":
            return
        time.sleep(0.5)
    raise RuntimeError(f"timed out ({timeout} s) waiting for {what}: "
                       + " / ".join(db.query("SELECT collection, state, phase, backfill_records, last_error "
                                             "FROM sync.status")))


def run(db, fake, n, budget, nchanges, backfill_seconds, creds):
    source = f"bench{n}"
    pages_each = max(1, math.ceil(budget * backfill_seconds / n))
    records = pages_each * PAGE
    objects = [f"Bench_{n}_{k}__c" for k in range(1, n + 1)]
    for o in objects:
        fake.admin("POST", "objects", {"name": o, "records": records})
    ids = {o: [r["Id"] for r in fake.admin("GET", f"records/{o}")] for o in objects}
    options = json.dumps({"requests_per_second": budget, "burst": 1, "batch_size": PAGE})
    db.query(f"SELECT sync.create_source({lit(source)}, 'salesforce', {lit(fake.url)}, {lit(creds)}, {lit(options)})")
    fake.admin("DELETE", "requests")
    tables, columns = {}, {}
    for o in objects:
        tables[o] = db.value(f"SELECT sync.add_collection({lit(source)}, {lit(o)})")
    t_added = time.time()
    wait_for(db, f"SELECT count(*) = {n} AND bool_and(phase = 'incremental' AND backfill_completed_at IS NOT NULL) "
                 f"FROM sync.status WHERE source = {lit(source)}",
             backfill_seconds * 4 + 120, f"the backfills of {n} collections")
    t_backfilled = time.time()
    for o in objects:
        columns[o] = dict(r.split("|", 1) for r in db.query(
            f"SELECT api_field, column_name FROM sync.columns WHERE source = {lit(source)} AND collection = {lit(o)}"))
        got = db.value(f"SELECT count(*) FROM {tables[o]}")
        if int(got) != records:
            raise RuntimeError(f"{tables[o]} holds {got} rows, the fake {records}")

    # 1. achieved rate during the backfill, from the fake's log
    entries = sorted(fake.admin("GET", "requests"), key=lambda e: e["t"])
    backfill = [e for e in entries if classify(e)[0] in ("query", "more")]
    t_first, t_last = backfill[0]["t"], backfill[-1]["t"]
    in_window = [e for e in entries if t_first <= e["t"] <= t_last]
    achieved = (len(in_window) - 1) / (t_last - t_first) if t_last > t_first else float("nan")
    kinds = {}
    for e in in_window:
        kinds[classify(e)[0]] = kinds.get(classify(e)[0], 0) + 1
    log(f"{n:>2} collections: backfill of {n} x {records} records in {t_backfilled - t_added:.1f} s; "
        f"{len(in_window)} requests in {t_last - t_first:.1f} s ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))})")

    # 2. settle: every collection caught up three polling cycles after the backfills
    ready = float(db.value("SELECT extract(epoch from now())"))
    est = float(db.value(f"SELECT max(extract(epoch from est_max_lag)) FROM sync.status WHERE source = {lit(source)}"))
    wait_for(db, f"SELECT bool_and(last_caught_up_at > to_timestamp({ready} + 3 * {est})) "
                 f"FROM sync.status WHERE source = {lit(source)}", 60 + 10 * est, "three polling cycles")

    # 3. changes at random moments, each timed until the table shows it
    window = max(6 * est, 10.0)
    plan = sorted(random.uniform(0, window) for _ in range(nchanges))
    used = set()
    changes = []
    status_lag_max = 0.0
    status_over_est = float("-inf")
    fake.admin("DELETE", "requests")
    t0 = time.time()
    deadline = t0 + window + 10 * est + 60
    next_tick = t0
    next_sample = t0
    while time.time() < deadline:
        now = time.time()
        if plan and now - t0 >= plan[0]:
            plan.pop(0)
            o = random.choice(objects)
            rid = random.choice([i for i in ids[o] if i not in used])
            used.add(rid)
            name = f"bench {n}/{len(changes)} {random.randrange(10**9)}"
            amount = f"{random.uniform(1, 99999):.2f}"
            e = float(db.value(f"SELECT extract(epoch from est_max_lag) FROM sync.status "
                               f"WHERE source = {lit(source)} AND collection = {lit(o)}"))
            fake.admin("PATCH", f"records/{o}/{rid}", {"Name": name, "Amount__c": float(amount)})
            changes.append({"object": o, "id": rid, "name": name, "amount": amount, "est": e, "t": time.time()})
        if now >= next_sample:
            next_sample += 0.5
            over, most = db.value(f"SELECT max(extract(epoch from lag) - extract(epoch from est_max_lag)) "
                                  f"|| '|' || max(extract(epoch from lag)) "
                                  f"FROM sync.status WHERE source = {lit(source)}").split("|")
            status_over_est = max(status_over_est, float(over))
            status_lag_max = max(status_lag_max, float(most))
        pending = [c for c in changes if "lag" not in c]
        if pending:
            q = " UNION ALL ".join(
                f"SELECT {changes.index(c)} FROM {tables[c['object']]} WHERE id = {lit(c['id'])} "
                f"AND {columns[c['object']]['Name']} = {lit(c['name'])} "
                f"AND {columns[c['object']]['Amount__c']} = {c['amount']}" for c in pending)
            t_send = time.time()
            for k in db.query(q):
                changes[int(k)]["lag"] = t_send - changes[int(k)]["t"]
        if not plan and all("lag" in c for c in changes):
            break
        next_tick += TICK
        sleep = next_tick - time.time()
        if sleep > 0:
            time.sleep(sleep)
        else:
            next_tick = time.time()
    t1 = time.time()
    missing = [c for c in changes if "lag" not in c]
    if missing:
        raise RuntimeError(f"{len(missing)} changes never reached their tables: {missing[:3]}")
    lags = [c["lag"] for c in changes]
    est_mean = sum(c["est"] for c in changes) / len(changes)
    worst = max(changes, key=lambda c: c["lag"])
    entries = [e for e in fake.admin("GET", "requests") if t0 <= e["t"] <= t1]
    polls = sum(1 for e in entries if classify(e)[0] == "queryAll")
    deleted = sum(1 for e in entries if classify(e)[0] == "deleted")
    log(f"{n:>2} collections: {len(changes)} changes over {window:.1f} s; worst {worst['lag']:.3f} s on "
        f"{worst['object']} (est {worst['est']:.3f} s); over est + 1 s: "
        f"{sum(1 for c in changes if c['lag'] > c['est'] + 1)}; sync.status.lag (every 0.5 s) at most "
        f"{status_lag_max:.3f} s, at most {status_over_est:.3f} s over est_max_lag; {len(entries)} requests in {t1 - t0:.1f} s "
        f"({polls} polls, {deleted} delete checks) = {len(entries) / (t1 - t0):.2f}/s")

    db.query(f"SELECT sync.drop_source({lit(source)}, true)")
    for o in objects:
        fake.admin("DELETE", f"objects/{o}")
    return (n, budget, achieved, achieved / budget, est_mean, quantile(lags, 0.5), quantile(lags, 0.99),
            max(lags), max(lags) / est_mean, status_lag_max)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fake", required=True, help="the fake Salesforce's base URL")
    ap.add_argument("--host", required=True, help="Postgres socket directory or host")
    ap.add_argument("--port", required=True)
    ap.add_argument("--dbname", default="postgres")
    ap.add_argument("--user", default=None)
    ap.add_argument("--psql", default="psql")
    ap.add_argument("--budget", type=float, default=4.0)
    ap.add_argument("--collections", default="1,5,20")
    ap.add_argument("--changes", type=int, default=30)
    ap.add_argument("--backfill-seconds", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()

    seed = args.seed if args.seed is not None else random.randrange(10**6)
    random.seed(seed)
    log(f"seed {seed}")
    psql = [args.psql, "-h", args.host, "-p", str(args.port), "-d", args.dbname]
    if args.user:
        psql += ["-U", args.user]
    db = Psql(psql)
    fake = Fake(args.fake)
    creds = json.dumps({"client_id": "test-client", "client_secret": "test-secret",
                        "refresh_token": "test-refresh"})
    db.query("CREATE EXTENSION IF NOT EXISTS sync")
    budget = int(args.budget) if args.budget == int(args.budget) else args.budget
    rows = []
    for n in [int(x) for x in args.collections.replace(",", " ").split()]:
        started = time.time()
        rows.append(run(db, fake, n, budget, args.changes, args.backfill_seconds, creds))
        log(f"{n:>2} collections: measured in {time.time() - started:.0f} s")
    db.close()
    widths = [len(h) for h in HEADER]
    print("  ".join(h.rjust(w) for h, w in zip(HEADER, widths)))
    for r in rows:
        cells = [str(r[0]), f"{r[1]:g}", f"{r[2]:.2f}", f"{r[3]:.3f}", f"{r[4]:.3f}", f"{r[5]:.3f}",
                 f"{r[6]:.3f}", f"{r[7]:.3f}", f"{r[8]:.2f}", f"{r[9]:.3f}"]
        print("  ".join(c.rjust(w) for c, w in zip(cells, widths)))


if __name__ == "__main__":
    main()
