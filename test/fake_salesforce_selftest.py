#!/usr/bin/python3
"""Self-test for test/fake_salesforce.py (stdlib only).

Run: /usr/bin/python3 test/fake_salesforce_selftest.py
Starts the fake on a free port, exercises the behaviours the sync test suite
relies on, and exits non-zero on the first failure.
"""

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
    finally:
        fk.stop()
    print("all fake_salesforce self-tests passed")


if __name__ == "__main__":
    main()
