#!/usr/bin/python3
"""Self-test for test/fake_airtable.py (stdlib only).

Run: /usr/bin/python3 test/fake_airtable_selftest.py
Starts the fake on a free port, exercises the behaviours the sync test suite
relies on, and exits non-zero on the first failure.
"""

import base64
import gzip
import hashlib
import hmac
import http.client
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from fakelib import WebhookReceiver
from fault_wire import test_fault_kinds

HERE = os.path.dirname(os.path.abspath(__file__))
PAT = "patFakeToken00001." + hashlib.sha256(b"fake-airtable-pat").hexdigest()
ITERATOR_GONE = {"error": {"type": "LIST_RECORDS_ITERATOR_NOT_AVAILABLE"}}
RATE_LIMITED = {"errors": [{"error": "RATE_LIMIT_REACHED", "message": "Rate limit exceeded. Please try again later"}]}


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


class Fake:
    def __init__(self, *args):
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "fake_airtable.py"),
                                      "--port", "0"] + list(args), stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("listening on "), line
        self.port = int(line.split()[2])
        self.base_url = "http://127.0.0.1:%d" % self.port
        self.token = PAT
        self.opener = urllib.request.build_opener(NoRedirect)
        bases = self.admin("GET", "bases")
        self.base = bases[0]["id"]
        self.tables = {t["name"]: t["id"] for t in bases[0]["tables"]}

    def stop(self):
        self.proc.terminate()
        self.proc.wait(5)

    def call(self, method, path, body=None, headers=None, form=None):
        """(status, headers, parsed JSON body or raw text)."""
        data, hdrs = None, dict(headers or {})
        if form is not None:
            data = urllib.parse.urlencode(form).encode()
            hdrs["Content-Type"] = "application/x-www-form-urlencoded"
        elif body is not None:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        req = urllib.request.Request(self.base_url + path, data=data, method=method, headers=hdrs)
        try:
            with self.opener.open(req, timeout=30) as resp:
                status, rh, payload = resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as e:
            status, rh, payload = e.code, e.headers, e.read()
        if rh.get("Content-Encoding") == "gzip":
            payload = gzip.decompress(payload)
        try:
            return status, rh, json.loads(payload) if payload else None
        except ValueError:
            return status, rh, payload.decode()

    def admin(self, method, path, body=None):
        status, _, payload = self.call(method, "/__admin/" + path, body=body)
        assert status in (200, 201), (method, path, status, payload)
        return payload

    def api(self, method, path, body=None, token=None):
        return self.call(method, path, body=body,
                         headers={"Authorization": "Bearer " + (token or self.token)})

    def list_path(self, table, **params):
        pairs = []
        for k, v in params.items():
            for item in (v if isinstance(v, list) else [v]):
                pairs.append((k.replace("__", "[]"), item))
        q = urllib.parse.urlencode(pairs)
        return "/v0/%s/%s%s" % (self.base, urllib.parse.quote(table, safe=""), "?" + q if q else "")

    def list_all(self, table, **params):
        """Follow offsets; returns (records, page sizes)."""
        records, sizes, offset = [], [], None
        while True:
            p = dict(params, **({"offset": offset} if offset else {}))
            status, _, page = self.api("GET", self.list_path(table, **p))
            assert status == 200, page
            records += page["records"]
            sizes.append(len(page["records"]))
            offset = page.get("offset")
            if not offset:
                return records, sizes

    def truth(self, table):
        return self.admin("GET", "records/%s/%s?by=name" % (self.base, urllib.parse.quote(table, safe="")))


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok -", what)


def test_auth(fk):
    status, _, body = fk.call("GET", "/v0/meta/bases")
    check(status == 401 and body == {"error": {"type": "AUTHENTICATION_REQUIRED",
                                               "message": "Authentication required"}}, "no token -> 401")
    status, _, body = fk.api("GET", "/v0/meta/bases", token="patNope")
    check(status == 401 and body["error"]["type"] == "UNAUTHORIZED", "bad token -> 401")
    status, _, body = fk.api("GET", "/v0/meta/bases")
    check(status == 200 and body["bases"][0]["id"] == fk.base and body["bases"][0]["permissionLevel"] == "create",
          "PAT lists bases")
    status, _, body = fk.api("GET", "/v0/nope/whatever")
    check(status == 404 and body == {"error": "NOT_FOUND"}, "malformed base id -> 404 NOT_FOUND")
    status, _, body = fk.api("GET", "/v0/appAAAAAAAAAAAAAA/Contacts")
    check(status == 403 and body["error"]["type"] == "INVALID_PERMISSIONS_OR_MODEL_NOT_FOUND",
          "unknown base -> 403 INVALID_PERMISSIONS_OR_MODEL_NOT_FOUND")
    status, _, body = fk.api("GET", fk.list_path("No such table"))
    check(status == 403 and body["error"]["type"] == "INVALID_PERMISSIONS_OR_MODEL_NOT_FOUND",
          "unknown table -> 403")
    limited = fk.admin("POST", "pats", {"scopes": ["data.records:read"]})["token"]
    status, _, body = fk.api("GET", "/v0/meta/bases/%s/tables" % fk.base, token=limited)
    check(status == 403, "PAT without schema.bases:read cannot read the schema")


def test_oauth(fk):
    status, h, tok = fk.call("POST", "/oauth2/v1/token", form={
        "grant_type": "refresh_token", "refresh_token": "test-refresh", "client_id": "test-client"})
    check(status == 200 and tok["token_type"] == "Bearer" and tok["expires_in"] == 3600
          and tok["refresh_expires_in"] > 0 and tok["refresh_token"] != "test-refresh"
          and "data.records:read" in tok["scope"].split(), "refresh -> new access + rotated refresh token")
    check(fk.api("GET", "/v0/meta/bases", token=tok["access_token"])[0] == 200, "OAuth access token works")
    status, _, err = fk.call("POST", "/oauth2/v1/token", form={
        "grant_type": "refresh_token", "refresh_token": "test-refresh", "client_id": "test-client"})
    check(status == 400 and err["error"] == "invalid_grant", "reusing a refresh token -> invalid_grant")
    status, _, err = fk.call("POST", "/oauth2/v1/token", form={
        "grant_type": "refresh_token", "refresh_token": tok["refresh_token"], "client_id": "test-client"})
    check(status == 400 and err["error"] == "invalid_grant", "reuse revoked the grant: newest refresh token dead")
    check(fk.api("GET", "/v0/meta/bases", token=tok["access_token"])[0] == 401, "... and its access token too")

    grant = fk.admin("POST", "oauth/grant", {})
    status, _, tok2 = fk.call("POST", "/oauth2/v1/token", form={
        "grant_type": "refresh_token", "refresh_token": grant["refresh_token"], "client_id": "test-client"})
    check(status == 200, "fresh admin grant refreshes")
    fk.admin("POST", "clock", {"advance": 3601})
    status, _, body = fk.api("GET", "/v0/meta/bases", token=tok2["access_token"])
    check(status == 401, "access token dead after 60 minutes")
    fk.admin("POST", "clock", {"offset": 0})
    status, _, err = fk.call("POST", "/oauth2/v1/token", form={"grant_type": "password", "client_id": "test-client"})
    check(status == 400 and err["error"] == "unsupported_grant_type", "unsupported grant type")

    # Authorization code + PKCE (S256).
    verifier = base64.urlsafe_b64encode(os.urandom(48)).decode().rstrip("=")
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
    q = urllib.parse.urlencode({"client_id": "test-client", "redirect_uri": "http://localhost/callback",
                                "response_type": "code", "scope": "data.records:read schema.bases:read",
                                "state": "xyz", "code_challenge": challenge, "code_challenge_method": "S256"})
    status, h, _ = fk.call("GET", "/oauth2/v1/authorize?" + q)
    loc = urllib.parse.urlsplit(h["Location"])
    params = dict(urllib.parse.parse_qsl(loc.query))
    check(status == 302 and params["state"] == "xyz" and params["code"], "authorize redirects with a code")
    form = {"grant_type": "authorization_code", "code": params["code"], "client_id": "test-client",
            "redirect_uri": "http://localhost/callback", "code_verifier": verifier[:-1] + "A"}
    status, _, err = fk.call("POST", "/oauth2/v1/token", form=form)
    check(status == 400 and err["error"] == "invalid_grant", "wrong PKCE verifier -> invalid_grant")
    status, _, tok3 = fk.call("POST", "/oauth2/v1/token", form=dict(form, code_verifier=verifier))
    check(status == 200 and tok3["scope"] == "data.records:read schema.bases:read", "PKCE exchange")
    status, _, body = fk.api("GET", "/v0/bases/%s/webhooks" % fk.base, token=tok3["access_token"])
    check(status == 403, "token without webhook:manage cannot list webhooks")


def test_meta(fk):
    status, _, schema = fk.api("GET", "/v0/meta/bases/%s/tables" % fk.base)
    tables = {t["name"]: t for t in schema["tables"]}
    check(status == 200 and set(tables) >= {"Contacts", "Companies & Partners", "Zoë's \"Tasks\" 🚀"},
          "schema lists tables (names with spaces, quotes, unicode)")
    contacts = tables["Contacts"]
    types = {f["name"]: f for f in contacts["fields"]}
    want = {"singleLineText", "multilineText", "email", "url", "number", "currency", "percent", "checkbox",
            "singleSelect", "multipleSelects", "date", "dateTime", "createdTime", "lastModifiedTime",
            "multipleRecordLinks", "multipleAttachments", "formula", "multipleLookupValues", "rollup",
            "autoNumber"}
    check(want <= {f["type"] for f in contacts["fields"]}, "Contacts has every required field type")
    check(contacts["primaryFieldId"] == contacts["fields"][0]["id"] and contacts["id"].startswith("tbl")
          and all(f["id"].startswith("fld") and len(f["id"]) == 17 for f in contacts["fields"]),
          "ids: tbl/fld + 14 chars, primary field first")
    check(types["Score"]["options"] == {"precision": 2}
          and types["Revenue"]["options"]["symbol"] == "$"
          and types["Score x2"]["options"]["result"]["type"] == "number"
          and types["Score x2"]["options"]["formula"] == "{%s} * 2" % types["Score"]["id"]
          and types["Company"]["options"]["linkedTableId"] == tables["Companies & Partners"]["id"]
          and types["Company Industry"]["options"]["result"]["type"] == "singleSelect"
          and "options" not in types["Email"]
          and contacts["views"][0]["type"] == "grid", "field options")
    status, _, schema2 = fk.api("GET", "/v0/meta/bases/%s/tables?include[]=visibleFieldIds" % fk.base)
    check("visibleFieldIds" in schema2["tables"][0]["views"][0], "include[]=visibleFieldIds")


def test_paging(fk):
    truth = fk.truth("Contacts")
    recs, sizes = fk.list_all("Contacts")
    check([r["id"] for r in recs] == [r["id"] for r in truth] and sizes[0] == 100
          and all(s == 100 for s in sizes[:-1]), "offset paging returns every record once, 100 per page")
    check(recs[0]["fields"] == truth[0]["fields"] and set(recs[0]) == {"id", "createdTime", "fields"},
          "record shape {id, createdTime, fields}")
    path = fk.list_path("Contacts", pageSize=7, fields__=["Name", "Score"], returnFieldsByFieldId="true")
    status, _, page = fk.api("GET", path)
    name_id = fk.api("GET", "/v0/meta/bases/%s/tables" % fk.base)[2]["tables"][0]["primaryFieldId"]
    check(status == 200 and len(page["records"]) == 7 and name_id in page["records"][0]["fields"]
          and all(k.startswith("fld") for r in page["records"] for k in r["fields"]),
          "pageSize, fields[], returnFieldsByFieldId")
    status, _, again = fk.api("GET", fk.list_path("Contacts", pageSize=7, offset=page["offset"]))
    status2, _, again2 = fk.api("GET", fk.list_path("Contacts", pageSize=7, offset=page["offset"]))
    check(status == status2 == 200 and again == again2 and again["records"][0]["id"] == truth[7]["id"],
          "re-sending an offset repeats its page")
    status, _, err = fk.api("GET", fk.list_path("Contacts", pageSize=101))
    check(status == 422 and err["error"]["type"] == "INVALID_REQUEST_UNKNOWN", "pageSize 101 -> 422")
    status, _, err = fk.api("GET", fk.list_path("Contacts", bogus=1))
    check(status == 422, "unknown query parameter -> 422")
    status, _, err = fk.api("GET", fk.list_path("Contacts", fields__=["Nope"]))
    check(status == 422 and err == {"error": {"type": "UNKNOWN_FIELD_NAME", "message": 'Unknown field name: "Nope"'}},
          "unknown field in fields[] -> UNKNOWN_FIELD_NAME")
    status, _, page = fk.api("POST", "/v0/%s/%s/listRecords" % (fk.base, fk.tables["Contacts"]),
                             {"pageSize": 3, "fields": ["Name"], "sort": [{"field": "Name", "direction": "desc"}]})
    names = [r["fields"].get("Name", "") for r in page["records"]]
    check(status == 200 and len(names) == 3 and names == sorted(names, key=str.lower, reverse=True),
          "POST listRecords with sort desc")
    status, _, page = fk.api("GET", fk.list_path("Contacts", pageSize=2, cellFormat="string"))
    check(status == 422, "cellFormat=string needs timeZone + userLocale")
    status, _, page = fk.api("GET", fk.list_path("Contacts", pageSize=2, cellFormat="string", timeZone="UTC",
                                                 userLocale="en-us"))
    check(status == 200 and all(isinstance(v, str) for r in page["records"] for v in r["fields"].values()),
          "cellFormat=string renders strings")


def test_empty_fields(fk):
    truth = fk.truth("Contacts")
    victim = next(r for r in truth if {"Notes", "Active", "Tags"} <= set(r["fields"]) or "Email" in r["fields"])
    fk.admin("PATCH", "records/%s/Contacts/%s" % (fk.base, victim["id"]),
             {"fields": {"Notes": "", "Active": False, "Tags": [], "Email": None}})
    status, _, page = fk.api("GET", fk.list_path("Contacts", filterByFormula="RECORD_ID() = '%s'" % victim["id"]))
    fields = page["records"][0]["fields"]
    check(status == 200 and not ({"Notes", "Active", "Tags", "Email"} & set(fields)),
          "cells set to ''/false/[]/null vanish from fields")
    check("Label" in fields and fields["Label"].endswith("<>"), "formula still rendered")


def test_offset_expiry(fk):
    status, _, page = fk.api("GET", fk.list_path("Contacts"))
    fk.admin("POST", "expire_offsets")
    status, _, err = fk.api("GET", fk.list_path("Contacts", offset=page["offset"]))
    check(status == 422 and err == ITERATOR_GONE, "admin-expired offset -> LIST_RECORDS_ITERATOR_NOT_AVAILABLE")
    status, _, page = fk.api("GET", fk.list_path("Contacts"))
    fk.admin("POST", "clock", {"advance": 301})
    status, _, err = fk.api("GET", fk.list_path("Contacts", offset=page["offset"]))
    check(status == 422 and err == ITERATOR_GONE, "idle offset expires after --offset-ttl")
    fk.admin("POST", "clock", {"offset": 0})
    status, _, page = fk.api("GET", fk.list_path("Contacts"))
    status, _, err = fk.api("GET", fk.list_path("Contacts", offset=page["offset"], filterByFormula="1"))
    check(status == 422 and err == ITERATOR_GONE, "offset reused with another filter -> iterator gone")
    status, _, err = fk.api("GET", fk.list_path("Contacts", offset="garbage"))
    check(status == 422 and err["error"]["type"] == "INVALID_OFFSET_VALUE", "malformed offset -> INVALID_OFFSET_VALUE")


def test_filter_formula(fk):
    truth = fk.truth("Contacts")
    stamps = [r["lastModifiedTime"] for r in truth[:150]]
    burst = max(set(stamps), key=stamps.count)
    check(sum(1 for r in truth if r["lastModifiedTime"] == burst) > 100, "seed: more than a page of records share one second")
    recs, sizes = fk.list_all("Contacts", filterByFormula="LAST_MODIFIED_TIME() >= DATETIME_PARSE('%s')" % burst)
    want = [r["id"] for r in truth if r["lastModifiedTime"] >= burst]
    check([r["id"] for r in recs] == want and len(sizes) >= 2, "LAST_MODIFIED_TIME() >= DATETIME_PARSE() over pages")
    recs, _ = fk.list_all("Contacts", filterByFormula="IS_AFTER(LAST_MODIFIED_TIME(), '%s')" % burst)
    check([r["id"] for r in recs] == [r["id"] for r in truth if r["lastModifiedTime"] > burst],
          "IS_AFTER is strict (ties excluded)")

    before = fk.admin("POST", "clock", {"offset": 0})["now"]
    time.sleep(1.1)
    target = truth[5]["id"]
    rec = fk.admin("PATCH", "records/%s/Contacts/%s" % (fk.base, target), {"fields": {"Score": 12345}})
    check(rec["lastModifiedTime"] > before and rec["lastModifiedTime"].endswith(".000Z"),
          "an edit moves LAST_MODIFIED_TIME (second precision)")
    recs, _ = fk.list_all("Contacts", filterByFormula="IS_AFTER(LAST_MODIFIED_TIME(), '%s')" % before)
    check([r["id"] for r in recs] == [target] and recs[0]["fields"]["Modified"] == rec["lastModifiedTime"],
          "filter finds exactly the edited record")

    formula = "AND({Score x2} = 24690, OR(RECORD_ID() = '%s', {Name} = 'nobody'), NOT({Status} = 'x'))" % target
    recs, _ = fk.list_all("Contacts", filterByFormula=formula)
    check([r["id"] for r in recs] == [target], "AND/OR/NOT, {Field Name} with spaces, formula fields, RECORD_ID()")
    for bad in ("AND(", "{Score} >", "NOSUCHFN(1)", "'unterminated"):
        status, _, err = fk.api("GET", fk.list_path("Contacts", filterByFormula=bad))
        check(status == 422 and err["error"]["type"] == "INVALID_FILTER_BY_FORMULA", "bad formula %r -> 422" % bad)
    status, _, err = fk.api("GET", fk.list_path("Contacts", filterByFormula="{Nope} = 1"))
    check(status == 422 and "Unknown field names: nope" in err["error"]["message"], "unknown field in formula")

    # A lookup changes when the linked company changes, without moving the contact's modified time.
    contact = next(r for r in fk.truth("Contacts") if r["fields"].get("Company"))
    company = contact["fields"]["Company"][0]
    fk.admin("PATCH", "records/%s/%s/%s" % (fk.base, urllib.parse.quote("Companies & Partners"), company),
             {"fields": {"Industry": "Brand new industry"}})
    after = fk.admin("GET", "records/%s/Contacts/%s?by=name" % (fk.base, contact["id"]))
    check("Brand new industry" in after["fields"]["Company Industry"]
          and after["lastModifiedTime"] == contact["lastModifiedTime"],
          "lookup value changed, LAST_MODIFIED_TIME did not")


def test_deletes(fk):
    truth = fk.truth("Contacts")
    victim = truth[3]["id"]
    fk.admin("DELETE", "records/%s/Contacts/%s" % (fk.base, victim))
    recs, _ = fk.list_all("Contacts")
    check(victim not in {r["id"] for r in recs} and len(recs) == len(truth) - 1, "deleted record vanishes")
    status, _, err = fk.api("GET", "/v0/%s/Contacts/%s" % (fk.base, victim))
    check(status == 404, "GET deleted record -> 404")
    status, _, page = fk.api("GET", fk.list_path("Contacts", pageSize=10))
    fk.admin("POST", "bulk_delete/%s/Contacts" % fk.base, {"ids": [r["id"] for r in truth[20:30]]})
    rest, _ = fk.list_all("Contacts", pageSize=10, offset=page["offset"])
    check(not ({r["id"] for r in rest} & {r["id"] for r in truth[20:30]}),
          "records deleted mid-scan are skipped by the iterator")


def test_rate_limits(fk):
    fk.admin("POST", "rate_limits", {"per_base": 5, "per_token": 0})
    path = fk.list_path("Contacts", pageSize=1)
    codes = [fk.api("GET", path)[0] for _ in range(5)]
    status, _, body = fk.api("GET", path)
    check(codes == [200] * 5 and status == 429 and body == RATE_LIMITED, "6th request in a second -> 429 body")
    time.sleep(1.2)
    status = fk.api("GET", path)[0]
    check(status == 429, "still 429 after the 1 s window: 30 s penalty")
    status = fk.api("GET", "/v0/%s/Contacts?pageSize=1" % fk.base2)[0]
    check(status == 200, "penalty is per base (other base fine)")
    fk.admin("POST", "clock", {"advance": 27})      # ~1.3 s of real time already passed
    check(fk.api("GET", path)[0] == 429, "still 429 28 s later")
    fk.admin("POST", "clock", {"advance": 3})
    check(fk.api("GET", path)[0] == 200, "200 again after 30 s")
    fk.admin("POST", "rate_limits", {"per_base": 0, "per_token": 3, "clear_penalties": True})
    codes = [fk.api("GET", p)[0] for p in (path, path, "/v0/%s/Contacts" % fk.base2, path)]
    check(codes == [200, 200, 200, 429], "per-token limit spans bases")
    fk.admin("POST", "rate_limits", {"per_base": 0, "per_token": 0, "clear_penalties": True})
    fk.admin("POST", "clock", {"offset": 0})


def test_webhooks(fk):
    contacts = fk.tables["Contacts"]
    hooks = "/v0/bases/%s/webhooks" % fk.base
    status, _, err = fk.api("POST", hooks, {"specification": {"options": {"filters": {"dataTypes": ["bogus"]}}}})
    check(status == 422, "invalid specification -> 422")
    status, _, hook = fk.api("POST", hooks, {"notificationUrl": None, "specification": {"options": {
        "filters": {"dataTypes": ["tableData", "tableFields"], "recordChangeScope": contacts},
        "includes": {"includePreviousCellValues": True}}}})
    check(status == 200 and hook["id"].startswith("ach") and base64.b64decode(hook["macSecretBase64"])
          and hook["expirationTime"], "create webhook -> {id, macSecretBase64, expirationTime}")
    payloads = "%s/%s/payloads" % (hooks, hook["id"])

    new = fk.admin("POST", "records/%s/Contacts" % fk.base, {"fields": {"Name": "Hook Test", "Status": "Lead"}})
    fk.admin("PATCH", "records/%s/Contacts/%s" % (fk.base, new["id"]), {"fields": {"Status": "Customer"}})
    fk.admin("DELETE", "records/%s/Contacts/%s" % (fk.base, new["id"]))
    fk.admin("PATCH", "records/%s/%s/%s" % (fk.base, urllib.parse.quote("Companies & Partners"),
                                            fk.truth("Companies & Partners")[0]["id"]), {"fields": {"Employees": 7}})
    status, _, res = fk.api("GET", payloads)
    check(status == 200 and len(res["payloads"]) == 3 and res["cursor"] == 4 and res["mightHaveMore"] is False,
          "3 payloads (out-of-scope table ignored), cursor 4")
    p1, p2, p3 = [p["changedTablesById"][contacts] for p in res["payloads"]]
    status_field = [f for f in fk.api("GET", "/v0/meta/bases/%s/tables" % fk.base)[2]["tables"][0]["fields"]
                    if f["name"] == "Status"][0]["id"]
    check(new["id"] in p1["createdRecordsById"]
          and p1["createdRecordsById"][new["id"]]["cellValuesByFieldId"][status_field]["name"] == "Lead",
          "created record, single select in V2 format {id, name, color}")
    ch = p2["changedRecordsById"][new["id"]]
    check(ch["current"]["cellValuesByFieldId"][status_field]["name"] == "Customer"
          and ch["previous"]["cellValuesByFieldId"][status_field]["name"] == "Lead", "changed record current/previous")
    check(p3["destroyedRecordIds"] == [new["id"]], "deleted record -> destroyedRecordIds")
    check(res["payloads"][0]["payloadFormat"] == "v0" and res["payloads"][0]["actionMetadata"]["source"] == "client"
          and res["payloads"][1]["baseTransactionNumber"] > res["payloads"][0]["baseTransactionNumber"],
          "payload header fields")
    status, _, res2 = fk.api("GET", payloads + "?cursor=4")
    check(res2 == {"payloads": [], "cursor": 4, "mightHaveMore": False}, "cursor at the end -> no payloads")
    status, _, res3 = fk.api("GET", payloads + "?cursor=2&limit=1")
    check(len(res3["payloads"]) == 1 and res3["cursor"] == 3 and res3["mightHaveMore"] is True, "limit + mightHaveMore")
    status, _, err = fk.api("GET", payloads + "?limit=51")
    check(status == 422, "limit > 50 -> 422")

    upd = fk.admin("POST", "bulk_update/%s/Contacts" % fk.base, {"count": 250, "fields": {"Notes": "bulk"}})
    status, _, res = fk.api("GET", payloads + "?cursor=4")
    tx = {p["baseTransactionNumber"] for p in res["payloads"]}
    n = sum(len(p["changedTablesById"][contacts]["changedRecordsById"]) for p in res["payloads"])
    check(len(res["payloads"]) == 3 and len(tx) == 1 and n == 250, "250-record transaction split over 3 payloads")
    fk.admin("POST", "fields/%s/Contacts" % fk.base, {"name": "Added later", "type": "singleLineText"})
    status, _, res = fk.api("GET", payloads + "?cursor=%d" % res["cursor"])
    created = res["payloads"][0]["changedTablesById"][contacts]["createdFieldsById"]
    check(list(created.values()) == [{"name": "Added later", "type": "singleLineText"}], "field created -> tableFields payload")

    status, _, listing = fk.api("GET", hooks)
    meta = listing["webhooks"][0]
    check(meta["id"] == hook["id"] and meta["isHookEnabled"] is True and meta["cursorForNextPayload"] == 8
          and meta["notificationUrl"] is None, "list webhooks")
    status, _, ref = fk.api("POST", "%s/%s/refresh" % (hooks, hook["id"]))
    check(status == 200 and ref["expirationTime"] >= hook["expirationTime"], "refresh -> new expirationTime")
    fk.admin("POST", "clock", {"advance": 8 * 86400})
    fk.admin("PATCH", "records/%s/Contacts/%s" % (fk.base, upd["ids"][0]), {"fields": {"Notes": "after expiry"}})
    status, _, listing = fk.api("GET", hooks)
    status2, _, res = fk.api("GET", payloads + "?cursor=8")
    check(listing["webhooks"][0]["isHookEnabled"] is False and res["payloads"] == [],
          "expired webhook: disabled, no new payloads")
    status, _, err = fk.api("POST", "%s/%s/refresh" % (hooks, hook["id"]))
    check(status == 422, "expired webhook cannot be refreshed")
    fk.admin("POST", "clock", {"offset": 0})
    check(fk.api("DELETE", "%s/%s" % (hooks, hook["id"]))[0] == 200, "delete webhook")


class PingSink(http.server.BaseHTTPRequestHandler):
    """Receives webhook notification pings."""
    received = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        PingSink.received.append((self.headers.get("X-Airtable-Content-MAC"), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_ping(fk):
    sink = http.server.HTTPServer(("127.0.0.1", 0), PingSink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    hooks = "/v0/bases/%s/webhooks" % fk.base
    url = "http://127.0.0.1:%d/hook" % sink.server_address[1]
    status, _, hook = fk.api("POST", hooks, {"notificationUrl": url, "specification": {"options": {
        "filters": {"dataTypes": ["tableData"]}}}})
    fk.admin("POST", "records/%s/Contacts" % fk.base, {"fields": {"Name": "Ping me"}})
    deadline = time.time() + 5
    while not PingSink.received and time.time() < deadline:
        time.sleep(0.05)
    sink.shutdown()
    mac, body = PingSink.received[0]
    want = hmac.new(base64.b64decode(hook["macSecretBase64"]), body, hashlib.sha256).hexdigest()
    ping = json.loads(body)
    check(mac == "hmac-sha256=" + want and ping["base"]["id"] == fk.base and ping["webhook"]["id"] == hook["id"],
          "notification ping carries X-Airtable-Content-MAC = HMAC-SHA256(secret, body)")
    time.sleep(0.2)
    listing = fk.api("GET", hooks)[2]["webhooks"]
    meta = [h for h in listing if h["id"] == hook["id"]][0]
    check(meta["lastNotificationResult"]["success"] is True and meta["lastSuccessfulNotificationTime"],
          "lastNotificationResult recorded")
    fk.api("DELETE", "%s/%s" % (hooks, hook["id"]))


def verify_airtable(req, mac_secret_b64):
    """Airtable's rule, written here independently: hex HMAC-SHA256 of the raw body, keyed by the
    base64-decoded macSecretBase64, in X-Airtable-Content-MAC as hmac-sha256=<hex>."""
    want = "hmac-sha256=" + hmac.new(base64.b64decode(mac_secret_b64), req["body"], hashlib.sha256).hexdigest()
    return hmac.compare_digest(req["headers"].get("X-Airtable-Content-MAC", ""), want)


def at_settle(fk, timeout=10):
    deadline = time.time() + timeout
    while fk.admin("GET", "webhooks/status")["pending"]:
        assert time.time() < deadline, "webhook deliveries did not settle"
        time.sleep(0.05)


def test_webhook_deliveries(fk):
    contacts = fk.tables["Contacts"]
    hooks = "/v0/bases/%s/webhooks" % fk.base
    rec = WebhookReceiver()
    try:
        status, _, hook = fk.api("POST", hooks, {"notificationUrl": rec.url, "specification": {"options": {
            "filters": {"dataTypes": ["tableData"], "recordChangeScope": contacts}}}})
        check(status == 200 and set(hook) == {"id", "macSecretBase64", "expirationTime"}, "create webhook with a URL")
        payloads = "%s/%s/payloads" % (hooks, hook["id"])
        first = fk.api("GET", hooks)[2]["webhooks"]
        meta = [h for h in first if h["id"] == hook["id"]][0]
        check(meta["areNotificationsEnabled"] is True and meta["isHookEnabled"] is True
              and meta["cursorForNextPayload"] == 1 and meta["lastNotificationResult"] is None
              and meta["lastSuccessfulNotificationTime"] is None and meta["notificationUrl"] == rec.url
              and meta["specification"]["options"]["filters"]["recordChangeScope"] == contacts,
              "list webhooks: every field of a fresh webhook")

        # One transaction of 250 records: 3 payloads, one ping.
        ids = fk.admin("POST", "bulk_update/%s/Contacts" % fk.base, {"count": 250, "fields": {"Notes": "ping"}})["ids"]
        (req,) = rec.wait(1)
        at_settle(fk)
        time.sleep(0.1)
        ping = json.loads(req["body"])
        check(len(rec.requests) == 1 and list(ping) == ["base", "webhook", "timestamp"]
              and ping["base"] == {"id": fk.base} and ping["webhook"] == {"id": hook["id"]}
              and req["headers"]["Content-Type"] == "application/json" and verify_airtable(req, hook["macSecretBase64"]),
              "3 payloads -> one ping {base, webhook, timestamp} with a verifying X-Airtable-Content-MAC")
        check(not verify_airtable(req, base64.b64encode(b"x" * 32).decode()), "MAC fails with another secret")

        # Cursor paging.
        fk.admin("POST", "bulk_delete/%s/Contacts" % fk.base, {"ids": ids[:2]})
        at_settle(fk)
        cursor, seen, more = 1, [], True
        while more:
            status, _, page = fk.api("GET", payloads + "?cursor=%d&limit=1" % cursor)
            check(status == 200 and len(page["payloads"]) == 1 and page["cursor"] == cursor + 1,
                  "limit=1 page at cursor %d -> cursor %d, mightHaveMore %s" % (cursor, page["cursor"],
                                                                              page["mightHaveMore"]))
            seen += page["payloads"]
            cursor, more = page["cursor"], page["mightHaveMore"]
        changed = sum(len(p["changedTablesById"][contacts].get("changedRecordsById", {})) for p in seen)
        check(len(seen) == 4 and changed == 250 and seen[3]["changedTablesById"][contacts]["destroyedRecordIds"]
              == ids[:2] and seen[3]["baseTransactionNumber"] > seen[0]["baseTransactionNumber"],
              "4 payloads: 250 changed records over 3, then destroyedRecordIds")
        check(fk.api("GET", payloads + "?cursor=%d" % cursor)[2] == {"payloads": [], "cursor": cursor,
                                                                     "mightHaveMore": False},
              "at the end: no payloads, same cursor")
        before = [h for h in fk.api("GET", hooks)[2]["webhooks"] if h["id"] == hook["id"]][0]
        check(before["lastNotificationResult"]["success"] is True and before["lastNotificationResult"]["retryNumber"] == 0
              and before["lastSuccessfulNotificationTime"] and before["cursorForNextPayload"] == cursor,
              "lastNotificationResult success, retryNumber 0; cursorForNextPayload")

        # Hold: pings dropped, payloads still recorded.
        rec.clear()
        fk.admin("POST", "webhooks/hold", {"hold": True})
        fk.admin("PATCH", "records/%s/Contacts/%s" % (fk.base, ids[5]), {"fields": {"Notes": "held"}})
        time.sleep(0.3)
        page = fk.api("GET", payloads + "?cursor=%d" % cursor)[2]
        log = fk.admin("GET", "webhook_deliveries")
        check(rec.requests == [] and len(page["payloads"]) == 1 and log[0]["status"] == "dropped"
              and log[0]["webhook_id"] == hook["id"], "held: no ping (logged dropped), the payload is there")
        cursor = page["cursor"]
        fk.admin("POST", "webhooks/hold", {"hold": False})

        # Retries.
        rec.script.append(500)
        fk.admin("PATCH", "records/%s/Contacts/%s" % (fk.base, ids[5]), {"fields": {"Notes": "retry"}})
        rec.wait(2)
        at_settle(fk)
        meta = [h for h in fk.api("GET", hooks)[2]["webhooks"] if h["id"] == hook["id"]][0]
        log = [d for d in fk.admin("GET", "webhook_deliveries") if d.get("webhook_id") == hook["id"]]
        check(meta["lastNotificationResult"]["success"] is True and meta["lastNotificationResult"]["retryNumber"] == 1
              and [(d["attempt"], d["status"]) for d in log[:2]] == [(2, 200), (1, 500)]
              and verify_airtable(rec.requests[1], hook["macSecretBase64"]),
              "500 -> retried: retryNumber 1, success")
        fk.admin("POST", "webhooks/config", {"retry_delays": [0.05, 0.05]})
        rec.clear()
        rec.script.extend([503, 503, 503])
        fk.admin("PATCH", "records/%s/Contacts/%s" % (fk.base, ids[5]), {"fields": {"Notes": "given up"}})
        rec.wait(3)
        at_settle(fk)
        result = [h for h in fk.api("GET", hooks)[2]["webhooks"] if h["id"] == hook["id"]][0]["lastNotificationResult"]
        check(result["success"] is False and result["retryNumber"] == 2 and result["willBeRetried"] is False
              and "503" in result["error"]["message"] and isinstance(result["durationMs"], int),
              "always 503: given up, lastNotificationResult {success false, error, retryNumber 2, willBeRetried false}")
        fk.admin("POST", "webhooks/config", {"retry_delays": [0.2, 0.5, 1.0]})

        # Crafted pings.
        rec.clear()
        r = fk.admin("POST", "webhooks/send", {"webhook_id": hook["id"]})
        (req,) = rec.wait(1)
        check(r["status"] == 200 and verify_airtable(req, hook["macSecretBase64"]), "send: a genuine ping")
        r = fk.admin("POST", "webhooks/send", {"webhook_id": hook["id"], "body": '{"base":{"id":"appForged"}}'})
        req = rec.wait(2)[1]
        check(req["body"] == b'{"base":{"id":"appForged"}}' and verify_airtable(req, hook["macSecretBase64"]),
              "send: a chosen body, MAC'd with the webhook's secret")
        fk.admin("POST", "webhooks/send", {"webhook_id": hook["id"], "mac": "hmac-sha256=00"})
        check(rec.wait(3)[2]["headers"]["X-Airtable-Content-MAC"] == "hmac-sha256=00"
              and not verify_airtable(rec.requests[2], hook["macSecretBase64"]), "send: MAC override")

        # Retention: purged payloads leave the cursor numbering alone.
        fk.admin("POST", "webhooks/purge_payloads", {"webhook_id": hook["id"]})
        fk.admin("PATCH", "records/%s/Contacts/%s" % (fk.base, ids[6]), {"fields": {"Notes": "after purge"}})
        page = fk.api("GET", payloads + "?cursor=1")[2]
        nxt = [h for h in fk.api("GET", hooks)[2]["webhooks"] if h["id"] == hook["id"]][0]["cursorForNextPayload"]
        check(len(page["payloads"]) == 1 and page["cursor"] == nxt and nxt > 5,
              "purged payloads are gone; cursors keep counting (cursor=1 -> only the newest)")

        # Listing payloads extends the webhook; expiry stops payloads and pings.
        fk.admin("POST", "clock", {"advance": 6 * 86400})
        fk.api("GET", payloads + "?cursor=%d" % nxt)
        fk.admin("POST", "clock", {"advance": 2 * 86400})
        meta = [h for h in fk.api("GET", hooks)[2]["webhooks"] if h["id"] == hook["id"]][0]
        check(meta["isHookEnabled"] is True, "listing payloads extended the webhook by 7 days")
        fk.admin("POST", "clock", {"offset": 0})
        rec.clear()
        expired = fk.admin("POST", "webhooks/expire", {"webhook_id": hook["id"]})
        fk.admin("PATCH", "records/%s/Contacts/%s" % (fk.base, ids[6]), {"fields": {"Notes": "expired"}})
        time.sleep(0.3)
        meta = [h for h in fk.api("GET", hooks)[2]["webhooks"] if h["id"] == hook["id"]][0]
        status, _, err = fk.api("POST", "%s/%s/refresh" % (hooks, hook["id"]))
        check(expired == {"expired": [hook["id"]]} and rec.requests == [] and meta["isHookEnabled"] is False
              and meta["cursorForNextPayload"] == nxt and status == 422,
              "expired: isHookEnabled false, no payload, no ping, refresh refused")
        status, _, gone = fk.api("DELETE", "%s/%s" % (hooks, hook["id"]))
        check(status == 200 and gone == {} and fk.api("GET", payloads)[0] == 404, "delete webhook -> {}; then 404")

        # At most 10 webhooks per base.
        live = len(fk.api("GET", hooks)[2]["webhooks"])
        made = []
        spec = {"notificationUrl": None, "specification": {"options": {"filters": {"dataTypes": ["tableData"]}}}}
        for _ in range(10 - live):
            status, _, h = fk.api("POST", hooks, spec)
            assert status == 200, h
            made.append(h["id"])
        status, _, err = fk.api("POST", hooks, spec)
        check(status == 422 and err["error"]["type"] == "TOO_MANY_WEBHOOKS_IN_BASE", "11th webhook -> 422 TOO_MANY_WEBHOOKS_IN_BASE")
        for hid in made:
            fk.api("DELETE", "%s/%s" % (hooks, hid))

        # Webhook calls share the base's 5 req/s limit.
        fk.admin("POST", "rate_limits", {"per_base": 5, "per_token": 0, "clear_penalties": True})
        codes = [fk.api("GET", hooks)[0] for _ in range(6)]
        check(codes == [200] * 5 + [429], "webhook endpoints count towards 5 req/s per base")
        fk.admin("POST", "rate_limits", {"per_base": 0, "per_token": 0, "clear_penalties": True})
    finally:
        rec.stop()


def test_schema_changes(fk):
    f = fk.admin("POST", "fields/%s/Contacts" % fk.base, {"name": "Rank", "type": "number", "options": {"precision": 0}})
    rec = fk.truth("Contacts")[0]
    fk.admin("PATCH", "records/%s/Contacts/%s" % (fk.base, rec["id"]), {"fields": {"Rank": 3}})
    status, _, page = fk.api("GET", fk.list_path("Contacts", pageSize=1))
    check(page["records"][0]["fields"].get("Rank") == 3, "added field readable")
    fk.admin("DELETE", "fields/%s/Contacts/%s" % (fk.base, f["id"]))
    status, _, page = fk.api("GET", fk.list_path("Contacts", pageSize=1))
    status2, _, schema = fk.api("GET", "/v0/meta/bases/%s/tables" % fk.base)
    check("Rank" not in page["records"][0]["fields"]
          and f["id"] not in {x["id"] for x in schema["tables"][0]["fields"]}, "removed field gone")
    t = fk.admin("POST", "tables/%s" % fk.base, {"name": "Ünïcode 'new' table"})
    fk.admin("POST", "bulk_create/%s/%s" % (fk.base, t["id"]), {"count": 5})
    recs, _ = fk.list_all("Ünïcode 'new' table")
    check(len(recs) == 5, "created table + bulk_create readable by name")
    hooks = "/v0/bases/%s/webhooks" % fk.base
    status, _, hook = fk.api("POST", hooks, {"specification": {"options": {
        "filters": {"dataTypes": ["tableData"], "recordChangeScope": t["id"]}}}})
    fk.admin("DELETE", "tables/%s/%s" % (fk.base, t["id"]))
    check(fk.api("GET", fk.list_path(t["id"]))[0] == 403, "deleted table -> 403")
    res = fk.api("GET", "%s/%s/payloads" % (hooks, hook["id"]))[2]
    meta = fk.api("GET", hooks)[2]["webhooks"][-1]
    check(res["payloads"][-1]["error"] is True and res["payloads"][-1]["code"] == "INVALID_FILTERS"
          and meta["isHookEnabled"] is False, "watched table deleted -> INVALID_FILTERS error payload, hook off")


def test_faults_log(fk):
    fk.admin("DELETE", "requests")
    fk.admin("POST", "faults", {"path_regex": "/v0/meta/bases$", "status": 503, "count": 2})
    codes = [fk.api("GET", "/v0/meta/bases")[0] for _ in range(3)]
    check(codes == [503, 503, 200], "503 fault twice, then normal")
    fk.admin("POST", "faults", {"path_regex": "/v0/meta/bases$", "drop": True})
    try:
        fk.api("GET", "/v0/meta/bases")
        dropped = False
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError):
        dropped = True
    check(dropped, "drop fault closes the connection")
    deadline = time.time() + 2
    log = fk.admin("GET", "requests")
    while len(log) < 4 and time.time() < deadline:
        time.sleep(0.05)        # the dropped request is logged after its connection closed
        log = fk.admin("GET", "requests")
    check(len(log) == 4 and set(log[0]) == {"t", "method", "path", "query", "status"} and log[0]["status"] == 503,
          "request log entries {t, method, path, query, status}")


def test_speed(fk):
    conn = http.client.HTTPConnection("127.0.0.1", fk.port, timeout=30)
    offset, pages, t0 = None, 0, time.time()
    while True:
        path = fk.list_path("Contacts", **({"offset": offset} if offset else {}))
        conn.request("GET", path, headers={"Authorization": "Bearer " + PAT, "Accept-Encoding": "gzip"})
        resp = conn.getresponse()
        body = json.loads(gzip.decompress(resp.read()))
        assert resp.status == 200, body
        pages += 1
        offset = body.get("offset")
        if not offset:
            break
    per_page = (time.time() - t0) / pages
    check(per_page < 0.25, "%d pages on one keep-alive connection, %.0f ms/page" % (pages, per_page * 1000))
    conn.close()


def main():
    fk = Fake("--bases", "2", "--tables", "3", "--records", "450", "--seed", "7", "--rate-limit", "0",
              "--token-rate-limit", "0")
    fk.base2 = fk.admin("GET", "bases")[1]["id"]
    try:
        test_auth(fk)
        test_oauth(fk)
        test_meta(fk)
        test_paging(fk)
        test_empty_fields(fk)
        test_offset_expiry(fk)
        test_filter_formula(fk)
        test_deletes(fk)
        test_rate_limits(fk)
        test_webhooks(fk)
        test_ping(fk)
        test_webhook_deliveries(fk)
        test_schema_changes(fk)
        test_faults_log(fk)
        test_fault_kinds(fk, fk.list_path("Contacts", pageSize=20), {"Authorization": "Bearer " + PAT},
                         r"^/v0/app[^/]+/Contacts\?pageSize=20", lambda d: [r["fields"] for r in d["records"]],
                         set(), "airtable", fk.list_path("Contacts", pageSize=20, filterByFormula="FALSE()"))
        test_speed(fk)
    finally:
        fk.stop()
    print("all fake_airtable self-tests passed")


if __name__ == "__main__":
    main()
