#!/usr/bin/python3
"""Self-test for test/fake_salesforce.py (stdlib only).

Run: /usr/bin/python3 test/fake_salesforce_selftest.py
Starts the fake on a free port, exercises the behaviours the sync test suite
relies on, and exits non-zero on the first failure.
"""

import calendar
import gzip
import http.client
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
V = "/services/data/v60.0"


class Fake:
    def __init__(self, *args):
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "fake_salesforce.py"),
                                      "--port", "0"] + list(args),
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("listening on "), line
        self.port = int(line.split()[2])
        self.base = "http://127.0.0.1:%d" % self.port
        self.token = None

    def stop(self):
        self.proc.terminate()
        self.proc.wait(5)

    def call(self, method, path, body=None, headers=None, form=None, raw=False):
        """(status, headers, parsed JSON body)."""
        data, hdrs = None, dict(headers or {})
        if form is not None:
            data = urllib.parse.urlencode(form).encode()
            hdrs["Content-Type"] = "application/x-www-form-urlencoded"
        elif body is not None:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                status, rh, payload = resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as e:
            status, rh, payload = e.code, e.headers, e.read()
        if rh.get("Content-Encoding") == "gzip":
            payload = gzip.decompress(payload)
        if raw:
            return status, rh, payload
        return status, rh, json.loads(payload) if payload else None

    def admin(self, method, path, body=None):
        status, _, payload = self.call(method, "/__admin/" + path, body=body)
        assert status in (200, 201), (method, path, status, payload)
        return payload

    def login(self):
        status, _, tok = self.call("POST", "/services/oauth2/token", form={
            "grant_type": "refresh_token", "client_id": "test-client",
            "client_secret": "test-secret", "refresh_token": "test-refresh"})
        assert status == 200, tok
        self.token = tok["access_token"]
        return tok

    def api(self, path, headers=None):
        h = {"Authorization": "Bearer " + self.token}
        h.update(headers or {})
        return self.call("GET", path, headers=h)

    def query(self, soql, endpoint="query", batch=None):
        hdrs = {"Sforce-Query-Options": "batchSize=%d" % batch} if batch else None
        return self.api("%s/%s?q=%s" % (V, endpoint, urllib.parse.quote(soql, safe="")), hdrs)

    def query_all_pages(self, soql, endpoint="query", batch=None):
        """Follow nextRecordsUrl; returns (records, page sizes)."""
        status, _, page = self.query(soql, endpoint, batch)
        assert status == 200, page
        records, sizes = list(page["records"]), [len(page["records"])]
        total = page["totalSize"]
        while not page["done"]:
            status, _, page = self.api(page["nextRecordsUrl"])
            assert status == 200, page
            assert page["totalSize"] == total
            records += page["records"]
            sizes.append(len(page["records"]))
        return records, sizes


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok -", what)


def test_oauth(fk):
    tok = fk.login()
    check(tok["instance_url"] == fk.base and tok["token_type"] == "Bearer"
          and "expires_in" not in tok and tok["access_token"].startswith("00D")
          and "!" in tok["access_token"] and tok["issued_at"].isdigit(), "token response shape")
    good = {"grant_type": "refresh_token", "client_id": "test-client",
            "client_secret": "test-secret", "refresh_token": "test-refresh"}
    for change, error in [({"refresh_token": "nope"}, "invalid_grant"),
                          ({"client_id": "nope"}, "invalid_client_id"),
                          ({"grant_type": "password"}, "unsupported_grant_type")]:
        status, _, body = fk.call("POST", "/services/oauth2/token", form=dict(good, **change))
        check(status == 400 and body["error"] == error, "token error %s" % error)


def test_describe(fk):
    status, _, versions = fk.call("GET", "/services/data/")
    check(status == 200 and versions[-1]["version"] == "67.0", "versions list")
    status, h, g = fk.api(V + "/sobjects/")
    names = {o["name"]: o for o in g["sobjects"]}
    check(status == 200 and names["Contact"]["keyPrefix"] == "003"
          and names["ContactHistory"]["replicateable"] is False
          and h.get("Sforce-Limit-Info", "").startswith("api-usage="), "describeGlobal")
    status, _, d = fk.api(V + "/sobjects/contact/describe")
    types = {f["name"]: f["type"] for f in d["fields"]}
    check(status == 200 and d["name"] == "Contact" and types["MailingAddress"] == "address"
          and types["Interests__c"] == "multipicklist" and types["Lifetime_Value__c"] == "currency",
          "describe Contact (case-insensitive name)")
    status, _, err = fk.api(V + "/sobjects/Nope/describe")
    check(status == 404 and err[0]["errorCode"] == "NOT_FOUND", "describe unknown -> 404")
    status, _, err = fk.api("/services/data/v20.0/sobjects/")
    check(status == 404, "unsupported version -> 404")


def test_soql_errors(fk):
    status, _, err = fk.query("SELECT Id,Foo FROM Contact")
    check(status == 400 and err[0]["errorCode"] == "INVALID_FIELD"
          and err[0]["message"].startswith("\nSELECT Id,Foo FROM Contact\n          ^\nERROR at Row:1:Column:11\n"),
          "unknown field -> INVALID_FIELD with caret")
    status, _, err = fk.query("SELECT Id FROM Foo")
    check(status == 400 and err[0]["errorCode"] == "INVALID_TYPE", "unknown object -> INVALID_TYPE")
    status, _, err = fk.query("SELECT Id FROM Contact WHERE")
    check(status == 400 and err[0]["errorCode"] == "MALFORMED_QUERY", "parse failure -> MALFORMED_QUERY")
    # An unencoded '+' in the URL is a space: Salesforce rejects the literal.
    status, _, err = fk.api(V + "/query?q=SELECT+Id+FROM+Contact+WHERE+SystemModstamp+>+2024-05-01T00:00:00+00:00")
    check(status == 400 and err[0]["errorCode"] == "MALFORMED_QUERY", "raw '+' in datetime -> MALFORMED_QUERY")
    status, _, res = fk.query("SELECT Id FROM Contact WHERE SystemModstamp > 2024-05-01T00:00:00+00:00 "
                              "AND CreatedDate < 2099-01-01T00:00:00.000+0000 AND LastModifiedDate > 2020-01-01T00:00:00Z")
    check(status == 200, "datetime literal forms accepted")
    status, _, res = fk.query("select count() from CONTACT where lastname = 'o\\'brien'")
    check(status == 200 and res["totalSize"] > 0 and res["records"] == [], "COUNT() + escaped quote, case-insensitive")


def contacts_sorted(fk):
    recs = fk.admin("GET", "records/Contact")
    return sorted(recs, key=lambda r: (r["SystemModstamp"], r["Id"]))


def test_keyset_pagination(fk):
    ordered = contacts_sorted(fk)
    stamps = {}
    for r in ordered:
        stamps[r["SystemModstamp"]] = stamps.get(r["SystemModstamp"], 0) + 1
    shared = [ts for ts, n in stamps.items() if n == 300]
    check(len(shared) == 1, "seed has one SystemModstamp shared by 300 records")
    ts = shared[0]
    group = [r for r in ordered if r["SystemModstamp"] == ts]
    cursor = group[99]
    lit = ts.replace(".000+0000", "Z")
    soql = ("SELECT Id,FirstName,SystemModstamp,IsDeleted FROM Contact WHERE SystemModstamp > %s "
            "OR (SystemModstamp = %s AND Id > '%s') ORDER BY SystemModstamp, Id" % (lit, lit, cursor["Id"]))
    got, sizes = fk.query_all_pages(soql, batch=200)
    want = ordered[ordered.index(cursor) + 1:]
    check([r["Id"] for r in got] == [r["Id"] for r in want],
          "keyset query inside a shared timestamp, batchSize=200: every record once, in order")
    check(sizes[0] == 200 and all(s == 200 for s in sizes[:-1]), "pages of 200")
    check(got[0]["attributes"]["type"] == "Contact" and list(got[0])[:2] == ["attributes", "Id"],
          "record shape: attributes first")

    # Keyset loop with LIMIT 2000 across the whole object (crosses the >2000-record burst).
    seen, last = [], None
    while True:
        where = "" if last is None else " WHERE SystemModstamp > %s OR (SystemModstamp = %s AND Id > '%s')" % (
            last[0], last[0], last[1])
        status, _, page = fk.query("SELECT Id,SystemModstamp FROM Contact%s ORDER BY SystemModstamp, Id LIMIT 2000" % where)
        assert status == 200, page
        check(page["done"] is True and "nextRecordsUrl" not in page, "LIMIT 2000 page is done") if not seen else None
        if not page["records"]:
            break
        seen += [r["Id"] for r in page["records"]]
        tail = page["records"][-1]
        last = (tail["SystemModstamp"].replace(".000+0000", "Z"), tail["Id"])
    check(seen == [r["Id"] for r in ordered] and len(set(seen)) == len(seen),
          "keyset LIMIT 2000 loop returns all %d records exactly once" % len(seen))


def test_deletes(fk):
    victim, hard_victim = [r["Id"] for r in fk.admin("GET", "records/Contact")[:2]]
    before = fk.query("SELECT COUNT() FROM Contact")[2]["totalSize"]
    fk.admin("DELETE", "records/Contact/" + victim)
    fk.admin("DELETE", "records/Contact/%s?hard=1" % hard_victim)
    _, _, q = fk.query("SELECT Id, IsDeleted FROM Contact WHERE Id = '%s'" % victim)
    _, _, qa = fk.query("SELECT Id, IsDeleted FROM Contact WHERE Id = '%s'" % victim, endpoint="queryAll")
    check(q["totalSize"] == 0 and qa["totalSize"] == 1 and qa["records"][0]["IsDeleted"] is True,
          "query hides, queryAll shows soft delete")
    _, _, qa = fk.query("SELECT Id FROM Contact WHERE Id = '%s'" % hard_victim, endpoint="queryAll")
    check(qa["totalSize"] == 0, "hard delete gone from queryAll")
    check(fk.query("SELECT COUNT() FROM Contact")[2]["totalSize"] == before - 2, "count drops by 2")

    # Deletions in the current minute are not covered yet: move the clock 2 minutes on.
    now = fk.admin("POST", "clock", {"offset": 120})["now"]
    end = now[:19] + "Z"
    start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 600))
    status, _, res = fk.api(V + "/sobjects/Contact/deleted/?start=%s&end=%s" % (
        urllib.parse.quote(start), urllib.parse.quote(end)))
    ids = [d["id"] for d in res["deletedRecords"]]
    check(status == 200 and victim in ids and hard_victim in ids
          and res["latestDateCovered"].endswith(":00.000+0000"), "getDeleted lists soft and hard deletes")
    status, _, err = fk.api(V + "/sobjects/Contact/deleted/?start=%s" % start)
    check(status == 400 and err[0]["errorCode"] == "MISSING_ARGUMENT", "getDeleted needs end")
    status, _, err = fk.api(V + "/sobjects/Contact/deleted/?start=%s&end=%s" % (end, start))
    check(status == 400 and err[0]["errorCode"] == "INVALID_REPLICATION_DATE", "getDeleted start after end")
    status, _, err = fk.api(V + "/sobjects/Contact/deleted/?start=2020-01-01T00:00:00Z&end=%s" % end)
    check(status == 400 and err[0]["errorCode"] == "INVALID_REPLICATION_DATE", "getDeleted older than 15 days")
    fk.admin("POST", "set_earliest_deleted", {"at": end})
    status, _, err = fk.api(V + "/sobjects/Contact/deleted/?start=%s&end=%s" % (start, end))
    check(status == 400 and err[0]["errorCode"] == "INVALID_REPLICATION_DATE", "purged delete log -> error")
    fk.admin("POST", "set_earliest_deleted", {"at": end, "mode": "report"})
    status, _, res = fk.api(V + "/sobjects/Contact/deleted/?start=%s&end=%s" % (start, end))
    check(status == 200 and res["earliestDateAvailable"] > start.replace("Z", ""), "purged delete log -> report mode")
    fk.admin("POST", "clock", {"offset": 0})


def test_writes(fk):
    rec = fk.admin("POST", "records/Contact", {"LastName": "Ng", "FirstName": "Ada", "Interests__c": ["Art", "Music"]})
    check(rec["Id"].startswith("003") and len(rec["Id"]) == 18 and rec["Name"] == "Ada Ng"
          and rec["SystemModstamp"].endswith(".000+0000"), "admin create")
    res = fk.admin("POST", "bulk_update/Contact", {"count": 5, "fields": {"Title": "Bulk"}})
    _, _, q = fk.query("SELECT Id FROM Contact WHERE SystemModstamp = %s" % res["SystemModstamp"].replace(".000+0000", "Z"))
    check(len(res["ids"]) == 5 and set(res["ids"]) <= {r["Id"] for r in q["records"]}, "bulk update shares one SystemModstamp")


def test_tokens_locators(fk):
    status, _, page = fk.query("SELECT Id FROM Contact", batch=200)
    fk.admin("POST", "expire_locators")
    status, _, err = fk.api(page["nextRecordsUrl"])
    check(status == 400 and err[0]["errorCode"] == "INVALID_QUERY_LOCATOR", "expired locator")
    fk.admin("POST", "expire_tokens")
    status, h, err = fk.api(V + "/limits/")
    check(status == 401 and err == [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]
          and h.get("WWW-Authenticate") == "Token", "401 after expire_tokens")
    fk.login()


def test_faults(fk):
    fk.admin("POST", "faults", {"path_regex": "/query", "status": 503, "count": 2})
    codes = [fk.query("SELECT Id FROM Account LIMIT 1")[0] for _ in range(3)]
    check(codes == [503, 503, 200], "503 fault twice, then normal")
    fk.admin("POST", "faults", {"path_regex": "/limits", "drop": True})
    try:
        fk.api(V + "/limits/")
        dropped = False
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError):
        dropped = True
    check(dropped, "drop fault closes the connection")
    fk.admin("POST", "faults", {"path_regex": "/limits", "delay": 0.5})
    t0 = time.time()
    status = fk.api(V + "/limits/")[0]
    check(status == 200 and time.time() - t0 >= 0.5, "delay fault")
    log = fk.admin("GET", "requests")
    check(log and {"t", "method", "path", "query", "status"} <= set(log[-1]), "request log")


def test_limits(fk):
    usage = fk.admin("GET", "stats")["api_usage"]
    fk.admin("POST", "limits", {"max": usage["used"] + 2})
    codes = [fk.api(V + "/limits/")[0] for _ in range(3)]
    status, h, err = fk.api(V + "/limits/")
    check(codes == [200, 200, 403] and err[0]["errorCode"] == "REQUEST_LIMIT_EXCEEDED"
          and h["Sforce-Limit-Info"] == "api-usage=%d/%d" % (usage["used"] + 2, usage["used"] + 2),
          "403 REQUEST_LIMIT_EXCEEDED over the daily allocation")
    fk.admin("POST", "limits", {"max": 1000000})


def test_misc(fk):
    fk.admin("POST", "query_options", {"page_cap": 137})
    recs, sizes = fk.query_all_pages("SELECT Id FROM Account", endpoint="queryAll", batch=500)
    check(sizes[0] == 137 and len(recs) == len({r["Id"] for r in recs}) == sum(sizes),
          "page cap: client must not assume page size == batchSize")
    _, _, page = fk.query("SELECT Id FROM Account", endpoint="queryAll")
    check("/query/" in page["nextRecordsUrl"], "queryAll nextRecordsUrl uses /query/")
    status, _, more = fk.api(page["nextRecordsUrl"].replace("/query/", "/queryAll/"))
    check(status == 200 and len(more["records"]) == min(137, page["totalSize"] - 137), "queryAll/{locator} also works")
    fk.admin("POST", "query_options", {"page_cap": None})
    acc = fk.admin("GET", "records/Account")[0]
    c = [r for r in fk.admin("GET", "records/Contact") if r["AccountId"] == acc["Id"]][0]
    fk.admin("PATCH", "records/Account/" + acc["Id"], {"Name": "Renamed Co"})
    _, _, res = fk.query("SELECT Account_Name__c, SystemModstamp FROM Contact WHERE Id = '%s'" % c["Id"])
    check(res["records"][0]["Account_Name__c"] == "Renamed Co"
          and res["records"][0]["SystemModstamp"] == c["SystemModstamp"],
          "cross-object formula changes without a SystemModstamp bump")


def test_keepalive_gzip_speed(fk):
    conn = http.client.HTTPConnection("127.0.0.1", fk.port, timeout=30)
    d = fk.api(V + "/sobjects/Contact/describe")[2]
    fields = ",".join(f["name"] for f in d["fields"] if not f["deprecatedAndHidden"])
    q = V + "/query?q=" + urllib.parse.quote("SELECT %s FROM Contact" % fields)
    t0 = time.time()
    for _ in range(3):
        conn.request("GET", q, headers={"Authorization": "Bearer " + fk.token, "Accept-Encoding": "gzip"})
        resp = conn.getresponse()
        body = json.loads(gzip.decompress(resp.read()))
        assert resp.status == 200 and len(body["records"]) == 2000
    per_page = (time.time() - t0) / 3
    check(True, "3 full-width 2000-record pages on one keep-alive connection, %.0f ms/page" % (per_page * 1000))
    conn.close()


def stamp_lit(stamp):
    return stamp.replace(".000+0000", "Z")


def test_request_log(fk):
    fk.admin("DELETE", "requests")
    t0 = time.time()
    fk.login()
    fk.admin("GET", "stats")
    fk.api(V + "/limits/")
    fk.admin("POST", "faults", {"path_regex": "/limits/recordCount", "delay": 0.6})
    t_sent = time.time()
    fk.api(V + "/limits/recordCount")
    t_done = time.time()
    fk.admin("GET", "faults")
    log = fk.admin("GET", "requests")
    check([(e["method"], e["path"], e["status"]) for e in log]
          == [("POST", "/services/oauth2/token", 200), ("GET", V + "/limits/", 200),
              ("GET", V + "/limits/recordCount", 200)],
          "request log: token + API requests, no admin calls")
    ts = [e["t"] for e in log]
    check(all(isinstance(t, float) for t in ts) and t0 <= ts[0] <= ts[1] <= ts[2] <= t_done
          and any(abs(t * 1000 - round(t * 1000)) > 1e-6 for t in ts),
          "request log t: float epoch seconds with sub-millisecond digits, in range")
    check(ts[2] >= t_sent and t_done - ts[2] >= 0.6,
          "request log t is the arrival time (0.6 s delayed answer came %.3f s after t)" % (t_done - ts[2]))


WIDGET_FIELDS = {
    # name: (type, length, precision, scale, custom, nillable)
    "Id": ("id", 18, 0, 0, False, False), "OwnerId": ("reference", 18, 0, 0, False, False),
    "IsDeleted": ("boolean", 0, 0, 0, False, False), "Name": ("string", 80, 0, 0, False, True),
    "CreatedDate": ("datetime", 0, 0, 0, False, False), "CreatedById": ("reference", 18, 0, 0, False, False),
    "LastModifiedDate": ("datetime", 0, 0, 0, False, False),
    "LastModifiedById": ("reference", 18, 0, 0, False, False),
    "SystemModstamp": ("datetime", 0, 0, 0, False, False),
    "Amount__c": ("currency", 0, 18, 2, True, True), "Quantity__c": ("double", 0, 18, 0, True, True),
    "Status__c": ("picklist", 255, 0, 0, True, True), "Notes__c": ("textarea", 255, 0, 0, True, True),
}


def deleted_window(fk, obj):
    """getDeleted over the last 10 minutes of the (shifted) clock, once the clock has moved 2 minutes on."""
    now = fk.admin("POST", "clock", {"offset": 120})["now"]
    end = now[:19] + "Z"
    start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(calendar.timegm(
        time.strptime(now[:19], "%Y-%m-%dT%H:%M:%S")) - 600))
    status, _, res = fk.api(V + "/sobjects/%s/deleted/?start=%s&end=%s" % (obj, start, end))
    status2, _, upd = fk.api(V + "/sobjects/%s/updated/?start=%s&end=%s" % (obj, start, end))
    fk.admin("POST", "clock", {"offset": 0})
    assert status == 200 and status2 == 200, (res, upd)
    return res, upd


def test_custom_objects(fk):
    made = fk.call("POST", "/__admin/objects", body={"name": "Widget_7__c", "records": 450})
    check(made[0] == 201 and made[2]["keyPrefix"] == "a01" and made[2]["records"] == 450
          and made[2]["name"] == "Widget_7__c" and made[2]["label"] == "Widget 7"
          and made[2]["fields"] == list(WIDGET_FIELDS), "POST /__admin/objects -> 201, keyPrefix a01")
    gadget = fk.admin("POST", "objects", {"name": "Gadget__c", "label": "Gizmo"})
    check(gadget["keyPrefix"] == "a02" and gadget["records"] == 0 and gadget["label"] == "Gizmo"
          and gadget["labelPlural"] == "Gizmos", "second object: keyPrefix a02, no records by default")
    seeded = fk.admin("GET", "records/Widget_7__c")

    # describeGlobal / sobject / describe
    _, _, g = fk.api(V + "/sobjects/")
    names = {o["name"]: o for o in g["sobjects"]}
    w = names.get("Widget_7__c", {})
    check(w.get("custom") is True and w["queryable"] and w["replicateable"] and w["retrieveable"]
          and w["createable"] and w["deletable"] and w["updateable"] and w["mergeable"] is False
          and w["keyPrefix"] == "a01" and w["label"] == "Widget 7" and w["labelPlural"] == "Widget 7s"
          and w["urls"]["describe"] == V + "/sobjects/Widget_7__c/describe"
          and names["Gadget__c"]["label"] == "Gizmo" and names["Contact"]["custom"] is False
          and set(w) == set(names["Contact"]), "describeGlobal lists the custom objects like real entries")
    status, _, basic = fk.api(V + "/sobjects/widget_7__c")
    check(status == 200 and basic["objectDescribe"]["name"] == "Widget_7__c", "sobject basic info")
    status, h, d = fk.api(V + "/sobjects/Widget_7__c/describe")
    got = {f["name"]: (f["type"], f["length"], f["precision"], f["scale"], f["custom"], f["nillable"])
           for f in d["fields"]}
    by = {f["name"]: f for f in d["fields"]}
    check(status == 200 and d["custom"] is True and [f["name"] for f in d["fields"]] == list(WIDGET_FIELDS)
          and got == WIDGET_FIELDS and by["Name"]["nameField"] is True and by["Name"]["label"] == "Widget 7 Name"
          and [p["value"] for p in by["Status__c"]["picklistValues"]][:2] == ["New", "In Progress"]
          and by["SystemModstamp"]["createable"] is False and h.get("Last-Modified"),
          "describe: Id, OwnerId, IsDeleted, Name(80), audit fields, Amount__c(18,2), Quantity__c(18,0), "
          "Status__c, Notes__c(255)")

    # seeded data
    ids = [r["Id"] for r in seeded]
    stamps = sorted(r["SystemModstamp"] for r in seeded)
    shared = max(stamps.count(s) for s in set(stamps))
    check(len(seeded) == 450 == len(set(ids)) and all(i.startswith("a01") and len(i) == 18 for i in ids)
          and stamps[-1] < "2025-03-01T00:00:00" and shared == 50
          and all(r["CreatedDate"] <= r["LastModifiedDate"] <= r["SystemModstamp"] for r in seeded)
          and all(r["Name"] and r["IsDeleted"] is False for r in seeded)
          and {r["Status__c"] for r in seeded} - {None} <= {"New", "In Progress", "On Hold", "Done", "Cancelled"}
          and any(r["Amount__c"] is None for r in seeded) and any(r["Notes__c"] for r in seeded),
          "450 seeded records: unique a01 ids, stamps before base-time, a 50-record shared second")

    # query / queryAll with locators, batchSize 200
    ordered = sorted(seeded, key=lambda r: (r["SystemModstamp"], r["Id"]))
    soql = "SELECT Id, Name, Amount__c, Status__c, SystemModstamp FROM Widget_7__c ORDER BY SystemModstamp, Id"
    for endpoint in ("query", "queryAll"):
        status, _, first = fk.query(soql, endpoint, batch=200)
        recs, sizes = fk.query_all_pages(soql, endpoint, batch=200)
        check(first["totalSize"] == 450 and first["done"] is False and "/query/" in first["nextRecordsUrl"]
              and sizes == [200, 200, 50]
              and [(r["Id"], r["Name"], r["Amount__c"], r["SystemModstamp"]) for r in recs]
              == [(r["Id"], r["Name"], r["Amount__c"], r["SystemModstamp"]) for r in ordered]
              and recs[0]["attributes"] == {"type": "Widget_7__c",
                                            "url": V + "/sobjects/Widget_7__c/" + recs[0]["Id"]},
              "%s Widget_7__c: pages 200/200/50, every record once in (SystemModstamp, Id) order" % endpoint)
    cut = ordered[99]
    lit = stamp_lit(cut["SystemModstamp"])
    recs, _ = fk.query_all_pages("SELECT Id FROM Widget_7__c WHERE SystemModstamp > %s OR (SystemModstamp = %s "
                                 "AND Id > '%s') ORDER BY SystemModstamp, Id" % (lit, lit, cut["Id"]), batch=200)
    check([r["Id"] for r in recs] == [r["Id"] for r in ordered[100:]], "keyset query on a custom object")
    status, _, rc = fk.api(V + "/limits/recordCount?sObjects=Widget_7__c,Gadget__c")
    check(status == 200 and rc["sObjects"] == [{"count": 450, "name": "Widget_7__c"},
                                               {"count": 0, "name": "Gadget__c"}], "limits/recordCount")
    status, _, one = fk.api(V + "/sobjects/Widget_7__c/%s?fields=Name,Amount__c" % ordered[0]["Id"])
    check(status == 200 and one["Name"] == ordered[0]["Name"], "retrieve one record")

    # admin CRUD seen through the API
    new = fk.admin("POST", "records/Widget_7__c", {"Name": "Fresh Widget", "Amount__c": 12.345,
                                                  "Quantity__c": 3, "Status__c": "New"})
    unnamed = fk.admin("POST", "records/Widget_7__c", {"Notes__c": "no name"})
    check(new["Id"].startswith("a01") and new["Amount__c"] == 12.35 and new["Quantity__c"] == 3.0
          and new["SystemModstamp"] > stamps[-1] and unnamed["Name"] == unnamed["Id"][:15],
          "admin create on a custom object (unnamed record named after its id)")
    status, _, err = fk.call("POST", "/__admin/records/Widget_7__c", body={"Nope__c": 1})
    check(status == 400, "admin create with an unknown field -> 400")
    upd = fk.admin("PATCH", "records/Widget_7__c/" + ordered[5]["Id"], {"Status__c": "Done"})
    soft, hard = ordered[10]["Id"], ordered[11]["Id"]
    fk.admin("DELETE", "records/Widget_7__c/" + soft)
    fk.admin("DELETE", "records/Widget_7__c/%s?hard=1" % hard)
    lit = stamp_lit(stamps[-1])
    _, _, q = fk.query("SELECT Id, Status__c, IsDeleted FROM Widget_7__c WHERE SystemModstamp > %s "
                       "ORDER BY SystemModstamp, Id" % lit)
    _, _, qa = fk.query("SELECT Id, Status__c, IsDeleted FROM Widget_7__c WHERE SystemModstamp > %s "
                        "ORDER BY SystemModstamp, Id" % lit, endpoint="queryAll")
    check({r["Id"] for r in q["records"]} == {new["Id"], unnamed["Id"], upd["Id"]}
          and {r["Id"]: r["IsDeleted"] for r in qa["records"]}
          == {new["Id"]: False, unnamed["Id"]: False, upd["Id"]: False, soft: True}
          and [r["Status__c"] for r in qa["records"] if r["Id"] == upd["Id"]] == ["Done"],
          "query sees creates/updates; queryAll also the soft delete, not the hard one")
    res, updated = deleted_window(fk, "Widget_7__c")
    check(sorted(d["id"] for d in res["deletedRecords"]) == sorted([soft, hard])
          and set(updated["ids"]) == {new["Id"], unnamed["Id"], upd["Id"]},
          "getDeleted lists soft + hard deletes, getUpdated the writes")
    status, _, rc = fk.api(V + "/limits/recordCount?sObjects=Widget_7__c")
    check(rc["sObjects"] == [{"count": 450, "name": "Widget_7__c"}], "recordCount after 2 creates, 2 deletes")
    back = fk.admin("POST", "undelete/Widget_7__c/" + soft)
    bulk = fk.admin("POST", "bulk_update/Widget_7__c", {"ids": [new["Id"], back["Id"]], "fields": {"Quantity__c": 9}})
    _, _, q = fk.query("SELECT Id, Quantity__c, SystemModstamp FROM Widget_7__c WHERE Id IN ('%s', '%s') "
                       "ORDER BY Id" % (new["Id"], soft))
    check(back["IsDeleted"] is False and [(r["Id"], r["Quantity__c"], r["SystemModstamp"]) for r in q["records"]]
          == sorted([(new["Id"], 9.0, bulk["SystemModstamp"]), (soft, 9.0, bulk["SystemModstamp"])]),
          "undelete and bulk_update on a custom object")
    fk.admin("DELETE", "records/Widget_7__c/" + soft)
    listed = fk.admin("GET", "objects")
    check([(o["name"], o["keyPrefix"], o["records"]) for o in listed]
          == [("Gadget__c", "a02", 0), ("Widget_7__c", "a01", 450)], "GET /__admin/objects")

    # bad requests
    for body, what in [({"name": "widget_7__C"}, "name in another case is a duplicate"),
                       ({"name": "WIDGET_7__c"}, "duplicate name"),
                       ({"name": "Widget"}, "no __c"), ({"name": "Widget__x"}, "wrong suffix"),
                       ({"name": "9Lives__c"}, "leading digit"), ({"name": "Two__Parts__c"}, "double underscore"),
                       ({"name": "Trailing___c"}, "trailing underscore"), ({"name": "A" * 41 + "__c"}, "too long"),
                       ({"name": 7}, "not a string"), ({}, "missing name"),
                       ({"name": "Ok__c", "records": -1}, "negative records"),
                       ({"name": "Ok__c", "records": "5"}, "records not a number"), ([1], "not an object")]:
        status, _, err = fk.call("POST", "/__admin/objects", body=body)
        check(status == 400 and "error" in err, "POST /__admin/objects 400: %s" % what)
    check("Ok__c" not in {o["name"] for o in fk.api(V + "/sobjects/")[2]["sobjects"]}, "failed creates left nothing")

    # dropping an object
    status, _, page = fk.query("SELECT Id FROM Widget_7__c", batch=200)
    dropped = fk.admin("DELETE", "objects/Widget_7__c")
    check(dropped == {"removed": "Widget_7__c", "records": 451}, "DELETE /__admin/objects/Widget_7__c")
    status, _, err = fk.query("SELECT Id FROM Widget_7__c")
    check(status == 400 and err[0]["errorCode"] == "INVALID_TYPE"
          and "sObject type 'Widget_7__c' is not supported" in err[0]["message"], "query after drop -> INVALID_TYPE")
    status, _, err = fk.query("SELECT Id FROM Widget_7__c", endpoint="queryAll")
    check(status == 400 and err[0]["errorCode"] == "INVALID_TYPE", "queryAll after drop -> INVALID_TYPE")
    for path in ("/sobjects/Widget_7__c/describe", "/sobjects/Widget_7__c",
                 "/sobjects/Widget_7__c/deleted/?start=2025-01-01T00:00:00Z&end=2025-01-02T00:00:00Z"):
        status, _, err = fk.api(V + path)
        check(status == 404 and err[0]["errorCode"] == "NOT_FOUND", "%s after drop -> 404 NOT_FOUND" % path)
    status, _, err = fk.api(page["nextRecordsUrl"])
    check(status == 400 and err[0]["errorCode"] == "INVALID_QUERY_LOCATOR", "its query locators are gone")
    _, _, g = fk.api(V + "/sobjects/")
    _, _, rc = fk.api(V + "/limits/recordCount")
    check("Widget_7__c" not in {o["name"] for o in g["sobjects"]} and "Gadget__c" in {o["name"] for o in g["sobjects"]}
          and "Widget_7__c" not in {o["name"] for o in rc["sObjects"]}, "gone from describeGlobal and recordCount")
    status, _, _ = fk.call("GET", "/__admin/records/Widget_7__c")
    check(status == 404, "admin records of a dropped object -> 404")
    check(fk.call("DELETE", "/__admin/objects/Widget_7__c")[0] == 404
          and fk.call("DELETE", "/__admin/objects/Contact")[0] == 400, "drop unknown -> 404, standard -> 400")
    again = fk.admin("POST", "objects", {"name": "Widget_7__c", "records": 5})
    res, _ = deleted_window(fk, "Widget_7__c")
    check(again["keyPrefix"] == "a03" and again["records"] == 5 and res["deletedRecords"] == [],
          "re-created object: fresh key prefix, no old deletes")
    fk.admin("DELETE", "objects/Widget_7__c")
    fk.admin("DELETE", "objects/Gadget__c")

    # the use case: one org with 20 collections
    made = [fk.admin("POST", "objects", {"name": "Coll_%02d__c" % i, "records": 30 + i}) for i in range(20)]
    _, _, g = fk.api(V + "/sobjects/")
    names = {o["name"]: o["keyPrefix"] for o in g["sobjects"] if o["custom"]}
    check(len({m["keyPrefix"] for m in made}) == 20 and names == {m["name"]: m["keyPrefix"] for m in made},
          "20 custom objects with distinct key prefixes in describeGlobal")
    counts = [fk.query("SELECT COUNT() FROM Coll_%02d__c" % i)[2]["totalSize"] for i in range(20)]
    check(counts == [30 + i for i in range(20)], "each answers SOQL with its own records")
    for m in made:
        fk.admin("DELETE", "objects/" + m["name"])


def test_custom_determinism_reset():
    """Same seed + same calls -> same records; another seed -> other records; reset drops custom objects."""
    a, b, c = Fake("--records", "20", "--seed", "1"), Fake("--records", "300", "--seed", "1"), \
        Fake("--records", "20", "--seed", "2")
    try:
        for fk in (a, b, c):
            fk.admin("POST", "objects", {"name": "Widget_7__c", "records": 40})
        ra, rb, rc = (fk.admin("GET", "records/Widget_7__c") for fk in (a, b, c))
        check(ra == rb and len(ra) == 40, "custom records are deterministic per seed")
        check({r["Id"] for r in ra}.isdisjoint({r["Id"] for r in rc}), "another seed gives other records")
        res = a.admin("POST", "reset", {})
        a.login()
        _, _, g = a.api(V + "/sobjects/")
        status, _, err = a.query("SELECT Id FROM Widget_7__c")
        check("Widget_7__c" not in res["records"] and "Widget_7__c" not in {o["name"] for o in g["sobjects"]}
              and status == 400 and err[0]["errorCode"] == "INVALID_TYPE" and a.admin("GET", "objects") == [],
              "reset drops custom objects")
        again = a.admin("POST", "objects", {"name": "Widget_7__c", "records": 40})
        check(again["keyPrefix"] == "a01" and a.admin("GET", "records/Widget_7__c") == ra,
              "after reset the same object comes back identical")
    finally:
        for fk in (a, b, c):
            fk.stop()


def main():
    fk = Fake("--records", "5000", "--seed", "1")
    try:
        test_oauth(fk)
        test_describe(fk)
        test_soql_errors(fk)
        test_keyset_pagination(fk)
        test_deletes(fk)
        test_writes(fk)
        test_tokens_locators(fk)
        test_faults(fk)
        test_limits(fk)
        test_misc(fk)
        test_keepalive_gzip_speed(fk)
        test_request_log(fk)
    finally:
        fk.stop()
    # A fresh org: test_deletes above moved earliestDateAvailable past "now".
    fk = Fake("--records", "50", "--seed", "1")
    try:
        fk.login()
        test_custom_objects(fk)
    finally:
        fk.stop()
    test_custom_determinism_reset()
    print("all fake_salesforce self-tests passed")


if __name__ == "__main__":
    main()
