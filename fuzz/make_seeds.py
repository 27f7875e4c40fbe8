#!/usr/bin/python3
"""Generate the fuzz seed corpora (fuzz/corpus/<provider>/) from the fakes' real answers.

Run:  /usr/bin/python3 fuzz/make_seeds.py [provider ...]     (after `make -C fuzz`)

Each seed is recorded by the harness itself in record mode: it runs one
scenario (see target_<provider>.c) of the provider's real code against a live
fake (test/fake_<provider>.py --port 0), every request going to the fake, and
writes the responses it got in the fuzz input format (harness.h). So a seed's
responses are exactly what the provider asks for, in order. Before each step
the fake's clock is set to the harness's (2026-01-01T00:00:00Z, moving as the
input's flags say), and admin calls listed for that step are made (changes,
deletes, merges, injected faults), so polls, event feeds, delete logs and
error answers hold something. Pages over 48 KB are cut (see trim_body()).

Seeds are committed; rerun this only when providers request new things.
"""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BUILD = os.path.join(HERE, "build")
BASE_TIME = "2026-01-01T00:00:00Z"
SEPARATOR = b"\n--\n"

STEPS = {1: 0x00, 2: 0x40, 4: 0x80, 8: 0xC0}
CLOCK = {0: 0x00, 61: 0x10, 400: 0x20, "16d": 0x30}


def flags(steps=1, clock=0, reconcile=False, alt_cred=False, alt_opt=False, describe=False):
    return (STEPS[steps] | CLOCK[clock] | (0x01 if reconcile else 0) | (0x02 if alt_cred else 0)
            | (0x04 if alt_opt else 0) | (0x08 if describe else 0))


class Fake:
    def __init__(self, name, args):
        script = os.path.join(REPO, "test", "fake_%s.py" % name)
        self.proc = subprocess.Popen(["/usr/bin/python3", script, "--port", "0"] + args,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            raise SystemExit("fake_%s did not start: %r" % (name, line))
        self.url = "http://127.0.0.1:%d" % int(line.split()[2])

    def admin(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            text = r.read()
        return json.loads(text) if text else None

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Recorder:
    def __init__(self, provider, fake, options=None):
        self.provider = provider
        self.fake = fake
        self.options = options
        self.dir = os.path.join(HERE, "corpus", provider)
        self.binary = os.path.join(BUILD, "fuzz_" + provider)
        self.names = []

    def record(self, name, scenario, fl, admin=(), options=None):
        """admin: [(step, METHOD, path, body or None)], made before that step (0: before describe)."""
        out = os.path.join(self.dir, name)
        lines = []
        for step, method, path, body in admin:
            lines.append("%d %s %s %s" % (step, method, path, json.dumps(body) if body is not None else ""))
        env = dict(os.environ, FUZZ_RECORD_OUT=out, FUZZ_RECORD_BASE=self.fake.url,
                   FUZZ_RECORD_HEADER="%02x%02x" % (scenario, fl), FUZZ_RECORD_ADMIN="\n".join(lines),
                   ASAN_OPTIONS="detect_leaks=0")
        opts = options if options is not None else self.options
        if opts:
            env["FUZZ_RECORD_OPTIONS"] = json.dumps(opts)
        r = subprocess.run([self.binary], env=env, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0 or not os.path.exists(out):
            sys.stderr.write(r.stderr)
            raise SystemExit("recording %s/%s failed" % (self.provider, name))
        size = os.path.getsize(out)
        print("  %-40s %6d bytes, %d responses" % (name, size, r.stderr.count("record: ") - 1))
        if size > 64 * 1024:
            raise SystemExit("%s/%s is larger than 64 KB" % (self.provider, name))
        self.names.append(name)
        return out

    def without_first_response(self, src, name, clear_flags):
        """The same input minus its first response (the token request), with flags cleared."""
        data = open(src, "rb").read()
        rest = data[2:]
        cut = rest.find(SEPARATOR)
        if cut < 0:
            return
        out = bytes([data[0], data[1] & ~clear_flags]) + rest[cut + len(SEPARATOR):]
        open(os.path.join(self.dir, name), "wb").write(out)
        print("  %-40s %6d bytes (from %s)" % (name, len(out), os.path.basename(src)))


def fault(step, regex, **kw):
    body = dict(path_regex=regex, **kw)
    return (step, "POST", "/__admin/faults", body)


def q(s):
    return urllib.parse.quote(s, safe="")


# ---------------------------------------------------------------- salesforce

def seeds_salesforce():
    fake = Fake("salesforce", ["--records", "60", "--deleted", "3", "--base-time", BASE_TIME,
                               "--client-id", "fuzz-client", "--client-secret", "CANARYsecret",
                               "--refresh-token", "CANARYrefresh"])
    try:
        fake.admin("POST", "/__admin/query_options", {"page_cap": 5})
        ids = [r["Id"] for r in fake.admin("GET", "/__admin/records/Contact")]
        rec = Recorder("salesforce", fake)
        NT = 0x02  # no token: the first request is the refresh
        s = rec.record("backfill-chain", 0, flags(steps=8, alt_cred=True))
        rec.without_first_response(s, "backfill-chain-with-token", NT)
        rec.record("describe-then-backfill", 0, flags(steps=4, alt_cred=True, describe=True))
        rec.record("expired-session", 0, flags(steps=2))  # CANARYaccess is refused: 401, refresh, retry
        rec.record("backfill-keyset", 2, flags(steps=2, alt_cred=True, alt_opt=True))
        rec.record("backfill-locator-expired", 1, flags(steps=2, alt_cred=True))
        s = rec.record("poll-with-changes", 3, flags(steps=4, clock=61, alt_cred=True), admin=[
            (0, "PATCH", "/__admin/records/Contact/" + ids[0], {"Email": "changed@example.com"}),
            (0, "PATCH", "/__admin/records/Contact/" + ids[1], {"LastName": "O'Brien; DROP TABLE x"}),
            (0, "DELETE", "/__admin/records/Contact/" + ids[2], None),
        ])
        rec.without_first_response(s, "poll-with-changes-with-token", NT)
        rec.record("poll-next-page", 4, flags(steps=2, alt_cred=True))
        rec.record("poll-then-getdeleted", 3, flags(steps=4, clock=400, alt_cred=True), admin=[
            (0, "DELETE", "/__admin/records/Contact/" + ids[3] + "?hard=1", None),
            (0, "DELETE", "/__admin/records/Contact/" + ids[4], None),
        ])
        rec.record("getdeleted-due", 5, flags(steps=2, alt_cred=True), admin=[
            (0, "DELETE", "/__admin/records/Contact/" + ids[5] + "?hard=1", None),
            (0, "POST", "/__admin/clock", {"now": "2026-01-01T00:02:00Z"}),
        ])
        rec.record("getdeleted-purged-log", 5, flags(steps=4, alt_cred=True), admin=[
            (0, "POST", "/__admin/set_earliest_deleted", {"at": "2025-12-31T23:59:00Z", "mode": "error"}),
        ])
        rec.record("getdeleted-too-old-then-sweep", 6, flags(steps=8, alt_cred=True))
        rec.record("sweep", 7, flags(steps=4, alt_cred=True))
        rec.record("sweep-locator-expired", 8, flags(steps=2, alt_cred=True))
        rec.record("reconcile", 3, flags(steps=4, reconcile=True, alt_cred=True))
        rec.record("column-backfill", 9, flags(steps=4, alt_cred=True))
        rec.record("custom-object", 10, flags(steps=4, alt_cred=True, describe=True), admin=[
            (0, "POST", "/__admin/objects", {"name": "Widget__c", "records": 12}),
        ])
        rec.record("unknown-object", 10, flags(steps=1, alt_cred=True, describe=True), admin=[
            (0, "DELETE", "/__admin/objects/Widget__c", None),
        ])
        rec.record("fault-503-then-ok", 0, flags(steps=2, alt_cred=True),
                   admin=[fault(0, "query", status=503, count=1)])
        rec.record("fault-malformed", 0, flags(steps=2, alt_cred=True),
                   admin=[fault(0, "query", corrupt="malformed", count=1)])
        rec.record("fault-wrong-types", 0, flags(steps=2, alt_cred=True),
                   admin=[fault(0, "query", corrupt="wrong_types", count=1)])
        rec.record("fault-huge-value", 0, flags(steps=1, alt_cred=True),
                   admin=[fault(0, "query", corrupt="huge_value", huge_bytes=20000, count=1)])
        rec.record("fault-wrong-types-describe", 0, flags(steps=1, alt_cred=True, describe=True),
                   admin=[fault(0, "describe", corrupt="wrong_types", count=1)])
        rec.record("request-limit-exceeded", 0, flags(steps=2, alt_cred=True),
                   admin=[(0, "POST", "/__admin/limits", {"used": 1000000, "max": 1000000})])
        fake.admin("POST", "/__admin/limits", {"used": 0, "max": 1000000})
        rec.record("token-refused", 0, flags(steps=1, alt_cred=True),
                   admin=[fault(0, "oauth2/token", status=400,
                                body={"error": "invalid_grant", "error_description": "expired access/refresh token"})])
        rec.record("token-500", 0, flags(steps=2, alt_cred=True),
                   admin=[fault(0, "oauth2/token", status=500, count=1)])
    finally:
        fake.stop()


# ---------------------------------------------------------------- stripe

STRIPE_KINDS = ["customers", "charges", "invoices", "subscriptions", "products", "prices", "payment_intents"]


def stripe_scenario(kind, state):
    return state * 7 + STRIPE_KINDS.index(kind)


def seeds_stripe():
    fake = Fake("stripe", ["--customers", "130", "--products", "4", "--prices", "6", "--subscriptions", "8",
                           "--invoices", "8", "--payment-intents", "6", "--charges", "6",
                           "--deleted-customers", "2", "--base-time", BASE_TIME,
                           "--api-key", "sk_test_CANARYkey", "--rate-limit", "0", "--endpoint-rate-limit", "0"])
    try:
        fake.admin("POST", "/__admin/keys", {"key": "rk_test_CANARYkey", "restricted": True,
                                             "permissions": STRIPE_KINDS + ["events"]})
        rec = Recorder("stripe", fake)
        for kind in STRIPE_KINDS:
            rec.record("backfill-%s" % kind, stripe_scenario(kind, 0), flags(steps=4))
        cus = fake.admin("GET", "/__admin/objects/customers")
        rec.record("backfill-then-events", stripe_scenario("customers", 0), flags(steps=8, clock=61), admin=[
            (2, "POST", "/__admin/objects/customers", {"email": "new@example.com", "name": "Zo\u00eb \"Q\""}),
            (2, "PATCH", "/__admin/objects/customers/" + cus[0]["id"], {"metadata": {"tier": "gold"}}),
            (3, "DELETE", "/__admin/objects/customers/" + cus[1]["id"], None),
        ])
        rec.record("seek-with-events", stripe_scenario("customers", 3), flags(steps=4, clock=61), admin=[
            (0, "POST", "/__admin/bulk/customers", {"count": 3}),
            (0, "DELETE", "/__admin/objects/customers/" + cus[2]["id"], None),
        ])
        rec.record("seek-subscriptions", stripe_scenario("subscriptions", 3), flags(steps=4), admin=[
            (0, "POST", "/__admin/objects/subscriptions", {}),
        ])
        rec.record("seek-products-deleted", stripe_scenario("products", 3), flags(steps=4), admin=[
            (0, "POST", "/__admin/objects/products", {"name": "Gadget"}),
        ])
        rec.record("poll-cursor-missing", stripe_scenario("customers", 2), flags(steps=4))
        rec.record("poll-invoices", stripe_scenario("invoices", 2), flags(steps=2, alt_opt=True))
        rec.record("backfill-next-page", stripe_scenario("charges", 1), flags(steps=2))
        rec.record("seek-next-page", stripe_scenario("prices", 4), flags(steps=2))
        rec.record("sweep-backfill", stripe_scenario("customers", 5), flags(steps=4))
        rec.record("seek-past-retention", stripe_scenario("payment_intents", 6), flags(steps=4))
        rec.record("reconcile", stripe_scenario("customers", 2), flags(steps=2, reconcile=True))
        rec.record("restricted-key", stripe_scenario("prices", 0), flags(steps=2, alt_cred=True, describe=True))
        rec.record("describe-products", stripe_scenario("products", 0), flags(steps=2, describe=True))
        rec.record("fault-429", stripe_scenario("customers", 0), flags(steps=2),
                   admin=[fault(0, "events", status=429, count=1)])
        rec.record("fault-500", stripe_scenario("charges", 0), flags(steps=2),
                   admin=[fault(0, "charges", status=500, count=1)])
        rec.record("fault-malformed", stripe_scenario("customers", 0), flags(steps=2),
                   admin=[fault(0, "v1/customers", corrupt="malformed", count=1)])
        rec.record("fault-wrong-types", stripe_scenario("invoices", 0), flags(steps=2),
                   admin=[fault(0, "v1/invoices", corrupt="wrong_types", count=1)])
        rec.record("fault-huge-value", stripe_scenario("customers", 0), flags(steps=1),
                   admin=[fault(0, "v1/customers", corrupt="huge_value", huge_bytes=20000, count=1)])
        rec.record("key-revoked", stripe_scenario("customers", 0), flags(steps=1, alt_cred=True),
                   admin=[(0, "DELETE", "/__admin/keys/rk_test_CANARYkey", None)])
    finally:
        fake.stop()


# ---------------------------------------------------------------- hubspot

HS_TYPES = ["contacts", "companies", "deals", "2-1234567", "contacts/companies"]


def hs_scenario(kind, state):
    return state * 5 + HS_TYPES.index(kind)


def seeds_hubspot():
    fake = Fake("hubspot", ["--contacts", "120", "--companies", "12", "--deals", "12", "--cars", "8",
                            "--archived", "4", "--base-time", BASE_TIME, "--search-lag", "0",
                            "--search-rate", "1000", "--burst-limit", "100000", "--oauth-burst-limit", "100000",
                            "--private-app-token", "CANARYaccess", "--client-id", "fuzz-client",
                            "--client-secret", "CANARYsecret", "--refresh-token", "CANARYrefresh"])
    try:
        rec = Recorder("hubspot", fake)
        contacts = [r["id"] for r in fake.admin("GET", "/__admin/records/contacts")]
        for kind in HS_TYPES[:4]:
            rec.record("backfill-%s" % kind.replace("/", "-"), hs_scenario(kind, 0), flags(steps=4))
        rec.record("backfill-oauth", hs_scenario("contacts", 0), flags(steps=2, alt_cred=True))
        rec.record("backfill-date-version", hs_scenario("deals", 0), flags(steps=2, alt_opt=True))
        rec.record("describe-contacts", hs_scenario("contacts", 0), flags(steps=2, describe=True))
        rec.record("describe-custom", hs_scenario("2-1234567", 0), flags(steps=2, describe=True, alt_opt=True))
        rec.record("backfill-chain", hs_scenario("companies", 0), flags(steps=8, clock=400))
        rec.record("poll-with-changes", hs_scenario("contacts", 2), flags(steps=4, clock=61), admin=[
            (0, "PATCH", "/__admin/records/contacts/" + contacts[0], {"properties": {"email": "x@example.com"}}),
            (0, "POST", "/__admin/merge/contacts", {"primaryObjectId": contacts[1], "objectIdToMerge": contacts[2]}),
            (0, "POST", "/__admin/flush_index", None),
        ])
        rec.record("poll-bulk-same-ms", hs_scenario("contacts", 2), flags(steps=2), admin=[
            (0, "POST", "/__admin/bulk_update/contacts", {"count": 12, "properties": {"jobtitle": "same ms"}}),
            (0, "POST", "/__admin/flush_index", None),
        ])
        rec.record("poll-tie", hs_scenario("companies", 3), flags(steps=2))
        rec.record("recycle-bin", hs_scenario("contacts", 4), flags(steps=2), admin=[
            (0, "DELETE", "/__admin/records/contacts/" + contacts[3], None),
        ])
        rec.record("recycle-bin-next", hs_scenario("contacts", 5), flags(steps=2))
        rec.record("sweep", hs_scenario("deals", 6), flags(steps=4))
        rec.record("column-backfill", hs_scenario("contacts", 7), flags(steps=2))
        rec.record("associations", hs_scenario("contacts/companies", 0), flags(steps=1))
        rec.record("associations-describe", hs_scenario("contacts/companies", 0), flags(steps=1, describe=True),
                   admin=[fault(0, "objects/contacts", status=503, count=1)])
        rec.record("associations-next", hs_scenario("contacts/companies", 1), flags(steps=1))
        rec.record("associations-incremental", hs_scenario("contacts/companies", 2), flags(steps=2, alt_cred=True))
        rec.record("fault-429", hs_scenario("contacts", 2), flags(steps=2),
                   admin=[fault(0, "search", status=429, count=1,
                                body={"status": "error", "message": "You have reached your secondly limit.",
                                      "errorType": "RATE_LIMIT", "policyName": "SECONDLY"})])
        rec.record("fault-502", hs_scenario("deals", 0), flags(steps=2),
                   admin=[fault(0, "objects/deals", status=502, count=1)])
        rec.record("fault-malformed", hs_scenario("contacts", 0), flags(steps=2),
                   admin=[fault(0, "objects/contacts", corrupt="malformed", count=1)])
        rec.record("fault-wrong-types", hs_scenario("companies", 0), flags(steps=2),
                   admin=[fault(0, "objects/companies", corrupt="wrong_types", count=2)])
        rec.record("fault-huge-value", hs_scenario("contacts", 2), flags(steps=1),
                   admin=[fault(0, "search", corrupt="huge_value", huge_bytes=20000, count=1)])
        rec.record("token-expired", hs_scenario("contacts", 0), flags(steps=2, alt_cred=True),
                   admin=[(1, "POST", "/__admin/expire_tokens", None)])
        rec.record("unknown-type", hs_scenario("2-1234567", 0), flags(steps=1, describe=True),
                   admin=[fault(0, "properties", status=404, count=1)])
    finally:
        fake.stop()


# ---------------------------------------------------------------- airtable

AT_TABLES = ["Contacts", "Companies & Partners", "Zo\u00eb's \"Tasks\" \U0001F680", "tblFUZZ0000000001"]


def at_scenario(table, state):
    return state * 4 + table


def seeds_airtable():
    fake = Fake("airtable", ["--tables", "3", "--records", "12", "--base-time", BASE_TIME,
                             "--rate-limit", "0", "--token-rate-limit", "0", "--pat", "CANARYaccess",
                             "--client-id", "fuzz-client", "--client-secret", "CANARYsecret",
                             "--refresh-token", "CANARYrefresh"])
    try:
        bases = fake.admin("GET", "/__admin/bases")
        base = bases[0]["id"]
        tables = {t["name"]: t["id"] for t in bases[0]["tables"]}
        contacts = tables["Contacts"]
        recs = [r["id"] for r in fake.admin("GET", "/__admin/records/%s/%s" % (base, contacts))]
        rec = Recorder("airtable", fake, options={"base_id": base})
        for i in range(3):
            rec.record("backfill-table%d" % i, at_scenario(i, 0), flags(steps=4, describe=True))
        rec.record("backfill-fixed-fields", at_scenario(0, 0), flags(steps=2))
        rec.record("backfill-oauth", at_scenario(0, 0), flags(steps=2, alt_cred=True))
        rec.record("backfill-chain", at_scenario(1, 0), flags(steps=8, clock=400, describe=True), admin=[
            (2, "PATCH", "/__admin/records/%s/%s/%s" % (base, contacts, recs[0]), {"fields": {"Name": "Changed"}}),
        ])
        rec.record("offset-expired", at_scenario(0, 1), flags(steps=2, describe=True))
        rec.record("poll-with-changes", at_scenario(0, 2), flags(steps=2, describe=True), admin=[
            (0, "PATCH", "/__admin/records/%s/%s/%s" % (base, contacts, recs[1]), {"fields": {"Name": "Zo\u00eb"}}),
        ])
        rec.record("poll-next-page-expired", at_scenario(0, 3), flags(steps=2))
        rec.record("sweep", at_scenario(0, 4), flags(steps=4, describe=True), admin=[
            (0, "DELETE", "/__admin/records/%s/%s/%s" % (base, contacts, recs[2]), None),
        ])
        rec.record("sweep-next-expired", at_scenario(1, 5), flags(steps=2, describe=True))
        rec.record("reconcile", at_scenario(0, 2), flags(steps=4, reconcile=True, describe=True))
        rec.record("column-backfill", at_scenario(0, 6), flags(steps=2))
        rec.record("unknown-table", at_scenario(3, 0), flags(steps=1, describe=True))
        rec.record("fault-429", at_scenario(0, 0), flags(steps=2, describe=True),
                   admin=[fault(0, "/v0/app", status=429, count=1,
                                body={"errors": [{"error": "RATE_LIMIT_REACHED",
                                                  "message": "Rate limit exceeded. Please try again later"}]})])
        rec.record("fault-500", at_scenario(0, 0), flags(steps=2),
                   admin=[fault(0, "/v0/app", status=500, count=1)])
        rec.record("fault-malformed", at_scenario(0, 0), flags(steps=2),
                   admin=[fault(0, "/v0/app", corrupt="malformed", count=1)])
        rec.record("fault-wrong-types", at_scenario(0, 0), flags(steps=2, describe=True),
                   admin=[fault(0, "/v0/app", corrupt="wrong_types", count=1)])
        rec.record("fault-wrong-types-schema", at_scenario(0, 0), flags(steps=1, describe=True),
                   admin=[fault(0, "meta/bases", corrupt="wrong_types", count=1)])
        rec.record("fault-huge-value", at_scenario(0, 0), flags(steps=1),
                   admin=[fault(0, "/v0/app", corrupt="huge_value", huge_bytes=20000, count=1)])
        rec.record("token-refused", at_scenario(0, 0), flags(steps=1, alt_cred=True),
                   admin=[fault(0, "oauth2", status=400,
                                body={"error": "invalid_grant", "error_description": "refresh token revoked"})])
    finally:
        fake.stop()


PROVIDERS = {"salesforce": seeds_salesforce, "stripe": seeds_stripe, "hubspot": seeds_hubspot,
             "airtable": seeds_airtable}


def main():
    wanted = sys.argv[1:] or list(PROVIDERS)
    for provider in wanted:
        if not os.path.exists(os.path.join(BUILD, "fuzz_" + provider)):
            raise SystemExit("build the harnesses first: make -C fuzz")
    for provider in wanted:
        d = os.path.join(HERE, "corpus", provider)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        print(provider)
        PROVIDERS[provider]()


if __name__ == "__main__":
    main()
