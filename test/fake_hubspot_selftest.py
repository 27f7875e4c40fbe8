#!/usr/bin/python3
"""Self-test for test/fake_hubspot.py (stdlib only).

Run: /usr/bin/python3 test/fake_hubspot_selftest.py
Starts the fake on a free port, exercises the behaviours the sync test suite
relies on, and exits non-zero on the first failure.
"""

import base64
import gzip
import hashlib
import hmac
import http.client
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from fakelib import WebhookReceiver
from fault_wire import test_fault_kinds

HERE = os.path.dirname(os.path.abspath(__file__))
PAT = "pat-na1-11111111-2222-3333-4444-555555555555"
DATETIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3})?Z$")
DATE_RE = re.compile(r"^\d{4}-\d\d-\d\d$")


class Fake:
    def __init__(self, *args):
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "fake_hubspot.py"),
                                      "--port", "0"] + list(args), stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("listening on "), line
        self.port = int(line.split()[2])
        self.base = "http://127.0.0.1:%d" % self.port
        self.token = PAT

    def stop(self):
        self.proc.terminate()
        self.proc.wait(5)

    def call(self, method, path, body=None, headers=None, form=None):
        """(status, headers, parsed JSON body or None)."""
        data, hdrs = None, dict(headers or {})
        if form is not None:
            data = urllib.parse.urlencode(form).encode()
            hdrs["Content-Type"] = "application/x-www-form-urlencoded"
        elif body is not None:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                status, rh, payload = resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as e:
            status, rh, payload = e.code, e.headers, e.read()
        if rh.get("Content-Encoding") == "gzip":
            payload = gzip.decompress(payload)
        return status, rh, json.loads(payload) if payload else None

    def admin(self, method, path, body=None):
        status, _, payload = self.call(method, "/__admin/" + path, body=body)
        assert status in (200, 201), (method, path, status, payload)
        return payload

    def api(self, method, path, body=None, token=None):
        return self.call(method, path, body=body, headers={"Authorization": "Bearer " + (token or self.token)})

    def get(self, path, token=None):
        return self.api("GET", path, token=token)

    def search(self, otype, body, token=None):
        """POST .../search, waiting out the 5 req/s search limit like a polite client."""
        while True:
            status, h, res = self.api("POST", "/crm/v3/objects/%s/search" % otype, body, token)
            if status != 429:
                return status, h, res
            time.sleep(0.25)

    def login(self, **change):
        form = dict({"grant_type": "refresh_token", "client_id": "test-client",
                     "client_secret": "test-secret", "refresh_token": "test-refresh"}, **change)
        return self.call("POST", "/oauth/v1/token", form=form)

    def truth(self, otype, query=""):
        return self.admin("GET", "records/%s%s" % (otype, query))


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok -", what)


def ms(iso):
    """Epoch ms of a wire datetime."""
    from datetime import datetime
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000 + 0.5)


def flt(f):
    """One filterGroup with the given filters."""
    return {"filterGroups": [{"filters": f}]}


# ----------------------------------------------------------------------------

def test_auth(fk):
    status, _, tok = fk.login()
    check(status == 200 and tok["token_type"] == "bearer" and tok["expires_in"] == 1800
          and tok["refresh_token"] == "test-refresh" and tok["access_token"], "OAuth token response shape")
    status, _, err = fk.login(refresh_token="nope")
    check(status == 400 and err["status"] == "BAD_REFRESH_TOKEN" and "correlationId" in err, "bad refresh token")
    status, _, err = fk.login(client_secret="nope")
    check(status == 400 and err["status"] == "BAD_CLIENT_SECRET", "bad client secret")
    oauth = tok["access_token"]
    status, h, _ = fk.get("/crm/v3/objects/contacts?limit=1", token=oauth)
    check(status == 200 and h.get("X-HubSpot-RateLimit-Max") == "110"
          and h.get("X-HubSpot-RateLimit-Daily") is None, "OAuth call: burst headers, no daily headers")
    status, h, _ = fk.get("/crm/v3/objects/contacts?limit=1")
    check(status == 200 and h.get("X-HubSpot-RateLimit-Daily") is not None
          and h.get("X-HubSpot-RateLimit-Interval-Milliseconds") == "10000", "private app: daily headers too")

    fk.admin("POST", "clock", {"offset": 1805})
    status, _, err = fk.get("/crm/v3/objects/contacts?limit=1", token=oauth)
    check(status == 401 and err["category"] == "EXPIRED_AUTHENTICATION" and err["status"] == "error"
          and re.match(r"^The OAuth token used to make this call expired \d+ second\(s\) ago\.$", err["message"])
          and "expire time" in err["context"] and "correlationId" in err,
          "expired access token -> 401 EXPIRED_AUTHENTICATION")
    status, _, tok2 = fk.login()
    check(fk.get("/crm/v3/objects/contacts?limit=1", token=tok2["access_token"])[0] == 200,
          "refreshed token works")
    fk.admin("POST", "clock", {"offset": 0})
    fk.admin("POST", "expire_tokens")
    status, _, err = fk.get("/crm/v3/objects/contacts?limit=1", token=tok2["access_token"])
    check(status == 401 and err["category"] == "EXPIRED_AUTHENTICATION", "admin expire_tokens")
    status, _, err = fk.get("/crm/v3/objects/contacts?limit=1", token="garbage")
    check(status == 401 and err["category"] == "INVALID_AUTHENTICATION", "unknown token -> INVALID_AUTHENTICATION")


def test_properties(fk):
    status, h, res = fk.get("/crm/v3/properties/contacts")
    props = {p["name"]: p for p in res["results"]}
    check(status == 200 and {"string", "number", "bool", "enumeration", "date", "datetime"}
          <= {p["type"] for p in props.values()}, "contact properties cover all types")
    check(all({"name", "label", "type", "fieldType", "options", "hasUniqueValue", "calculated",
               "modificationMetadata", "groupName", "hubspotDefined"} <= set(p) for p in props.values()),
          "property shape")
    check(props["email"]["hasUniqueValue"] and props["interests"]["fieldType"] == "checkbox"
          and {o["value"] for o in props["interests"]["options"]} >= {"food_wine", "music"}
          and props["hs_object_id"]["modificationMetadata"]["readOnlyValue"]
          and props["hs_analytics_num_visits"]["calculated"], "property details")
    check("health_notes" not in props and "lastmodifieddate" in props and "hs_lastmodifieddate" in props,
          "sensitive properties hidden by default")
    _, _, res = fk.get("/crm/v3/properties/contacts?dataSensitivity=sensitive")
    check([p["name"] for p in res["results"]] == ["health_notes"], "dataSensitivity=sensitive")
    for name in ("companies", "deals", "0-3", "2-1234567", "p62515_cars", "p_cars"):
        status, _, res = fk.get("/crm/v3/properties/%s" % name)
        assert status == 200 and res["results"], (name, status)
    check(True, "properties by name, objectTypeId and fully qualified name")
    status, _, err = fk.get("/crm/v3/properties/foo")
    check(status == 400 and err["message"] == "Unable to infer object type from: foo", "unknown object type -> 400")
    status, _, err = fk.get("/crm/v3/objects/foo")
    check(status == 400 and err["category"] == "VALIDATION_ERROR", "unknown object list -> 400")
    status, _, res = fk.get("/crm/v3/schemas")
    cars = res["results"][0]
    check(status == 200 and cars["objectTypeId"] == "2-1234567" and cars["name"] == "cars"
          and cars["fullyQualifiedName"] == "p62515_cars", "custom object schema")
    status, _, res = fk.get("/crm/properties/2026-03/deals")
    check(status == 200 and any(p["name"] == "dealstage" for p in res["results"]), "date-versioned path")


def all_props(fk, otype):
    return ",".join(p["name"] for p in fk.get("/crm/v3/properties/%s" % otype)[2]["results"])


def test_string_values(fk):
    seen_frac, seen_whole, seen_multi = False, False, False
    for otype in ("contacts", "companies", "deals", "p_cars"):
        types = {p["name"]: p for p in fk.get("/crm/v3/properties/%s" % otype)[2]["results"]}
        status, _, page = fk.get("/crm/v3/objects/%s?limit=100&properties=%s" % (otype, all_props(fk, otype)))
        assert status == 200, page
        for rec in page["results"]:
            for name, value in rec["properties"].items():
                if value is None:
                    continue
                assert isinstance(value, str), (otype, name, value)
                p = types[name]
                if p["type"] == "number":
                    float(value)
                elif p["type"] == "bool":
                    assert value in ("true", "false"), (name, value)
                elif p["type"] == "date":
                    assert DATE_RE.match(value), (name, value)
                elif p["type"] == "datetime":
                    assert DATETIME_RE.match(value), (name, value)
                    seen_frac |= "." in value
                    seen_whole |= "." not in value
                elif p["type"] == "enumeration" and p["fieldType"] == "checkbox":
                    seen_multi |= ";" in value
            assert DATETIME_RE.match(rec["createdAt"]) and rec["archived"] is False
    check(seen_frac and seen_whole and seen_multi,
          "every value a string or null; datetimes with and without millis; multi-select 'a;b'")


def walk_list(fk, otype, query=""):
    ids, after = [], None
    while True:
        path = "/crm/v3/objects/%s?limit=100%s%s" % (otype, query, "&after=" + after if after else "")
        status, _, page = fk.get(path)
        assert status == 200, page
        ids += [r["id"] for r in page["results"]]
        if "paging" not in page:
            return ids, page
        after = page["paging"]["next"]["after"]


def test_list_paging(fk):
    ids, _ = walk_list(fk, "contacts")
    truth = [r["id"] for r in fk.truth("contacts")]
    check(ids == truth and len(set(ids)) == len(ids), "list paging returns every live contact once, by id")
    check([int(i) for i in ids] == sorted(int(i) for i in ids) and len(ids[0]) < len(ids[-1]),
          "ids ascend numerically and cross digit counts")
    status, _, err = fk.get("/crm/v3/objects/contacts?limit=101")
    check(status == 400 and err["category"] == "VALIDATION_ERROR", "list limit > 100 -> 400")
    status, _, page = fk.get("/crm/v3/objects/contacts?limit=2&properties=email&properties=lastname")
    check(set(page["results"][0]["properties"]) == {"email", "lastname", "hs_object_id", "createdate",
                                                    "lastmodifieddate"}, "properties param (repeated)")
    status, _, page = fk.get("/crm/v3/objects/contacts?limit=1")
    check(set(page["results"][0]["properties"]) == {"createdate", "email", "firstname", "hs_object_id",
                                                    "lastmodifieddate", "lastname"}, "default properties")


def test_archived(fk):
    ids, _ = walk_list(fk, "contacts", "&archived=true")
    check(len(ids) == 5 and ids == [r["id"] for r in fk.truth("contacts", "?archived=1")],
          "archived=true lists the recycle bin")
    victim = fk.truth("contacts")[3]
    status, _, _ = fk.api("DELETE", "/crm/v3/objects/contacts/%s" % victim["id"])
    check(status == 204, "DELETE archives -> 204")
    status, _, page = fk.get("/crm/v3/objects/contacts?archived=true&limit=100&properties=lastmodifieddate")
    rec = [r for r in page["results"] if r["id"] == victim["id"]]
    check(rec and rec[0]["archived"] is True and DATETIME_RE.match(rec[0]["archivedAt"])
          and rec[0]["properties"]["lastmodifieddate"] == victim["properties"]["lastmodifieddate"]
          and rec[0]["updatedAt"] == victim["updatedAt"], "archived record: archivedAt set, stamp unchanged")
    check(fk.get("/crm/v3/objects/contacts/%s" % victim["id"])[0] == 404
          and fk.get("/crm/v3/objects/contacts/%s?archived=true" % victim["id"])[0] == 200,
          "read archived record only with archived=true")
    ids, _ = walk_list(fk, "contacts")
    check(victim["id"] not in ids, "archived record left the live list")


def search_all(fk, otype, body, page_size=200):
    results, after, total = [], None, None
    while True:
        b = dict(body, limit=page_size)
        if after:
            b["after"] = after
        status, _, res = fk.search(otype, b)
        assert status == 200, res
        total = res["total"]
        results += res["results"]
        if "paging" not in res:
            return results, total
        after = res["paging"]["next"]["after"]


def test_search(fk):
    fk.admin("POST", "flush_index")
    truth = fk.truth("contacts")
    cut = sorted(ms(r["properties"]["lastmodifieddate"]) for r in truth)[len(truth) - 700]
    body = dict(flt([{"propertyName": "lastmodifieddate", "operator": "GTE", "value": str(cut)}]),
                sorts=[{"propertyName": "lastmodifieddate", "direction": "ASCENDING"}],
                properties=["email", "lastmodifieddate"])
    got, total = search_all(fk, "contacts", body)
    want = {r["id"] for r in truth if ms(r["properties"]["lastmodifieddate"]) >= cut}
    stamps = [ms(r["properties"]["lastmodifieddate"]) for r in got]
    check(total == len(want) == len(got) and {r["id"] for r in got} == want and stamps == sorted(stamps),
          "search GTE lastmodifieddate, sorted ascending, all pages")

    status, h, res = fk.search("contacts", dict(flt([
        {"propertyName": "lifecyclestage", "operator": "EQ", "value": "customer"},
        {"propertyName": "email", "operator": "HAS_PROPERTY"}]), limit=1))
    want = [r for r in truth if r["properties"]["lifecyclestage"] == "customer" and r["properties"]["email"]]
    check(status == 200 and res["total"] == len(want) and not any(k.startswith("X-HubSpot-RateLimit") for k in h),
          "EQ + HAS_PROPERTY; search responses carry no rate-limit headers")
    status, _, res = fk.search("contacts", {"filterGroups": [
        {"filters": [{"propertyName": "interests", "operator": "IN", "values": ["art", "music"]}]},
        {"filters": [{"propertyName": "vip", "operator": "EQ", "value": "true"}]}], "limit": 1})
    want = [r for r in truth if {"art", "music"} & set((r["properties"]["interests"] or "").split(";"))
            or r["properties"]["vip"] == "true"]
    check(res["total"] == len(want), "IN on a multi-select OR bool EQ (two filterGroups)")
    lo, hi = sorted(ms(r["properties"]["createdate"]) for r in truth)[100], \
        sorted(ms(r["properties"]["createdate"]) for r in truth)[300]
    status, _, res = fk.search("contacts", dict(flt([{"propertyName": "createdate", "operator": "BETWEEN",
                                                      "value": str(lo), "highValue": str(hi)}]), limit=1))
    check(res["total"] == sum(1 for r in truth if lo <= ms(r["properties"]["createdate"]) <= hi), "BETWEEN epoch ms")
    status, _, res = fk.search("contacts", flt([{"propertyName": "hs_lastmodifieddate", "operator": "GTE",
                                                 "value": "0"}]))
    check(status == 200 and res["total"] == 0, "contacts: hs_lastmodifieddate search matches nothing")
    status, _, res = fk.search("deals", dict(flt([{"propertyName": "hs_lastmodifieddate", "operator": "GT",
                                                   "value": "2000-01-01T00:00:00Z"}]), limit=1))
    check(res["total"] == len(fk.truth("deals")), "deals: hs_lastmodifieddate with an ISO value")

    f = {"propertyName": "email", "operator": "HAS_PROPERTY"}
    for body, what in [({"filterGroups": [{"filters": [f]}] * 6}, "6 filterGroups"),
                       (flt([f] * 7), "7 filters in a group"),
                       ({"filterGroups": [{"filters": [f] * 6}] * 3 + [{"filters": [f]}]}, "19 filters in total"),
                       (dict(flt([f]), sorts=[{"propertyName": "email", "direction": "ASCENDING"}] * 2), "2 sorts"),
                       (dict(flt([f]), limit=201), "limit 201"),
                       (flt([{"propertyName": "nope", "operator": "EQ", "value": "x"}]), "unknown property")]:
        status, _, err = fk.search("contacts", body)
        check(status == 400 and err["category"] == "VALIDATION_ERROR" and err["status"] == "error", what + " -> 400")
    status, _, res = fk.search("contacts", {"filterGroups": [{"filters": [f] * 6}] * 3})
    check(status == 200, "18 filters in 3 groups of 6 are fine")

    # The seeded bulk import: 250 contacts share one stamp; ties come back in no id order.
    stamp = collections_mode([r["properties"]["lastmodifieddate"] for r in truth])
    body = dict(flt([{"propertyName": "lastmodifieddate", "operator": "EQ", "value": str(ms(stamp))}]),
                sorts=[{"propertyName": "lastmodifieddate", "direction": "DESCENDING"}])
    first, total = search_all(fk, "contacts", body)
    again, _ = search_all(fk, "contacts", body)
    ids = [int(r["id"]) for r in first]
    check(total == 250 and ids == [int(r["id"]) for r in again] and ids != sorted(ids) and len(set(ids)) == 250,
          "250-record tie: stable, complete, not in id order")


def collections_mode(values):
    counts = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return max(counts, key=counts.get)


def test_result_cap(fk):
    res = fk.admin("POST", "bulk_update/contacts", {"count": 10200, "properties": {"jobtitle": "Bulk"}})
    check(len(res["ids"]) == 10200, "bulk update of 10,200 contacts in one millisecond")
    fk.admin("POST", "flush_index")
    body = dict(flt([{"propertyName": "lastmodifieddate", "operator": "EQ", "value": str(res["epochMs"])}]),
                sorts=[{"propertyName": "hs_object_id", "direction": "ASCENDING"}], properties=["jobtitle"])
    status, _, page = fk.search("contacts", dict(body, limit=200, after="9800"))
    check(status == 200 and page["total"] == 10200 and len(page["results"]) == 200
          and page["paging"]["next"]["after"] == "10000", "page ending at result 10,000 still offers next")
    last = page["results"][-1]["id"]
    status, _, err = fk.search("contacts", dict(body, limit=200, after="10000"))
    check(status == 400 and err["category"] == "VALIDATION_ERROR", "paging beyond 10,000 -> 400")
    status, _, err = fk.search("contacts", dict(body, limit=200, after="9900"))
    check(status == 400, "after + limit > 10,000 -> 400")
    body["filterGroups"][0]["filters"].append({"propertyName": "hs_object_id", "operator": "GT", "value": last})
    rest, total = search_all(fk, "contacts", body)
    check(total == 200 and all(int(r["id"]) > int(last) for r in rest),
          "workaround: restart with hs_object_id GT last id (numeric compare)")


def test_search_lag(fk):
    fk.admin("POST", "search_lag", {"seconds": 1.5})
    victim = fk.truth("contacts")[10]
    status, _, rec = fk.api("PATCH", "/crm/v3/objects/contacts/%s" % victim["id"],
                            {"properties": {"firstname": "Lagtest"}})
    check(status == 200 and rec["properties"]["firstname"] == "Lagtest", "PATCH via API")
    _, _, res = fk.search("contacts", flt([{"propertyName": "firstname", "operator": "EQ", "value": "lagtest"}]))
    _, _, old = fk.search("contacts", dict(flt([{"propertyName": "hs_object_id", "operator": "EQ",
                                                 "value": victim["id"]}]), properties=["firstname"]))
    check(res["total"] == 0 and old["results"][0]["properties"]["firstname"] == victim["properties"]["firstname"],
          "fresh update invisible to search; search still shows the old value")
    status, _, new = fk.api("POST", "/crm/v3/objects/contacts", {"properties": {"email": "lag@example.com",
                                                                                "firstname": "Lagtest"}})
    check(status == 201 and new["id"], "create via API")
    time.sleep(1.7)
    _, _, res = fk.search("contacts", flt([{"propertyName": "firstname", "operator": "EQ", "value": "Lagtest"}]))
    check(res["total"] == 2 and {r["id"] for r in res["results"]} == {victim["id"], new["id"]},
          "after the lag both are searchable")
    fk.admin("POST", "search_lag", {"seconds": 60})
    fk.admin("PATCH", "records/contacts/%s" % victim["id"], {"properties": {"firstname": "Clockwise"}})
    _, _, res = fk.search("contacts", flt([{"propertyName": "firstname", "operator": "EQ", "value": "Clockwise"}]))
    fk.admin("POST", "clock", {"offset": 61})
    _, _, res2 = fk.search("contacts", flt([{"propertyName": "firstname", "operator": "EQ", "value": "Clockwise"}]))
    fk.admin("POST", "clock", {"offset": 0})
    check(res["total"] == 0 and res2["total"] == 1, "moving the clock past the lag makes writes searchable")
    fk.admin("POST", "search_lag", {"seconds": 0})


def test_rate_limits(fk):
    time.sleep(1.1)
    fk.admin("POST", "limits", {"burst_max": 5, "reset_windows": True})
    codes = [fk.get("/crm/v3/objects/deals?limit=1")[0] for _ in range(5)]
    status, h, err = fk.get("/crm/v3/objects/deals?limit=1")
    check(codes == [200] * 5 and status == 429 and err["errorType"] == "RATE_LIMIT"
          and err["policyName"] == "TEN_SECONDLY_ROLLING"
          and err["message"] == "You have reached your ten_secondly_rolling limit."
          and h["X-HubSpot-RateLimit-Remaining"] == "0", "burst limit -> 429 TEN_SECONDLY_ROLLING")
    fk.admin("POST", "limits", {"burst_max": 100000, "reset_windows": True})
    body = dict(flt([{"propertyName": "dealname", "operator": "HAS_PROPERTY"}]), limit=1)
    codes = [fk.api("POST", "/crm/v3/objects/deals/search", body)[0] for _ in range(5)]
    status, h, err = fk.api("POST", "/crm/v3/objects/deals/search", body)
    check(codes == [200] * 5 and status == 429 and err["policyName"] == "SECONDLY"
          and err["message"] == "You have reached your secondly limit.", "6th search in a second -> 429 SECONDLY")
    time.sleep(1.1)
    used = fk.admin("POST", "limits", {})["daily_used"]
    fk.admin("POST", "limits", {"daily_max": used + 1})
    first = fk.get("/crm/v3/objects/deals?limit=1")
    status, h, err = fk.get("/crm/v3/objects/deals?limit=1")
    tok = fk.login()[2]["access_token"]
    check(first[0] == 200 and first[1]["X-HubSpot-RateLimit-Daily-Remaining"] == "0"
          and status == 429 and err["policyName"] == "DAILY"
          and fk.get("/crm/v3/objects/deals?limit=1", token=tok)[0] == 200,
          "daily limit -> 429 DAILY for the private app; OAuth has no daily cap")
    fk.admin("POST", "limits", {"daily_max": 625000, "reset_windows": True})


def test_merge(fk):
    fk.admin("POST", "flush_index")
    contacts = fk.truth("contacts")
    a, b = contacts[20], contacts[21]
    comps = {x["toObjectId"] for c in (a, b) for x in fk.admin("GET", "associations/contacts/%s/companies" % c["id"])}
    status, _, merged = fk.api("POST", "/crm/v3/objects/contacts/merge",
                               {"primaryObjectId": a["id"], "objectIdToMerge": b["id"]})
    new_id = merged["id"]
    check(status == 200 and new_id not in (a["id"], b["id"]), "merge creates a record with a new id")
    status, _, rec = fk.get("/crm/v3/objects/contacts/%s?properties=hs_merged_object_ids,firstname" % a["id"])
    check(status == 200 and rec["id"] == new_id
          and set(rec["properties"]["hs_merged_object_ids"].split(";")) == {a["id"], b["id"]}
          and rec["properties"]["firstname"] == a["properties"]["firstname"],
          "old id reads the merged record; hs_merged_object_ids; primary's values win")
    ids, _ = walk_list(fk, "contacts")
    archived, _ = walk_list(fk, "contacts", "&archived=true")
    check(new_id in ids and a["id"] not in ids + archived and b["id"] not in ids + archived,
          "old ids in neither the list nor the archived list")
    _, _, assoc = fk.get("/crm/v4/objects/contacts/%s/associations/companies" % new_id)
    check({str(x["toObjectId"]) for x in assoc["results"]} == comps, "merged record keeps both records' companies")
    status, _, batch = fk.api("POST", "/crm/v3/objects/contacts/batch/read",
                              {"inputs": [{"id": b["id"]}, {"id": "1"}], "properties": ["email"]})
    check(status == 207 and batch["results"][0]["id"] == new_id and batch["errors"][0]["context"]["ids"] == ["1"],
          "batch read: merged id resolves, unknown id is an error (207)")
    fk.admin("POST", "flush_index")
    _, _, res = fk.search("contacts", flt([{"propertyName": "hs_object_id", "operator": "IN",
                                            "values": [a["id"], b["id"], new_id]}]))
    check([r["id"] for r in res["results"]] == [new_id], "search sees only the merged record")
    comp = fk.truth("companies")
    rec = fk.admin("POST", "merge/companies", {"primaryObjectId": comp[0]["id"], "objectIdToMerge": comp[1]["id"]})
    check(rec["properties"]["name"] == comp[0]["properties"]["name"] and rec["id"] != comp[0]["id"],
          "admin merge of companies")


def test_associations(fk):
    deals = fk.truth("deals")
    deal = next(d for d in deals if fk.admin("GET", "associations/deals/%s/contacts" % d["id"]))
    status, _, res = fk.get("/crm/v4/objects/deals/%s/associations/contacts" % deal["id"])
    first = res["results"][0]
    check(status == 200 and isinstance(first["toObjectId"], int)
          and first["associationTypes"] == [{"category": "HUBSPOT_DEFINED", "typeId": 3, "label": None}],
          "v4 read: toObjectId number, associationTypes {category, typeId, label}")
    contact = next(c for c in fk.truth("contacts") if fk.admin("GET", "associations/contacts/%s/companies" % c["id"]))
    _, _, res = fk.get("/crm/v4/objects/contacts/%s/associations/companies" % contact["id"])
    check({(t["typeId"], t["label"]) for t in res["results"][0]["associationTypes"]} == {(1, "Primary"), (279, None)},
          "primary company: typeIds 1 (Primary) and 279 (unlabeled)")

    other = next(c for c in fk.truth("contacts")
                 if not any(x["toObjectId"] == c["id"] for x in fk.admin("GET", "associations/deals/%s/contacts"
                                                                          % deal["id"])))
    fk.admin("PUT", "associations", {"fromType": "deals", "fromId": deal["id"], "toType": "contacts",
                                     "toId": other["id"]})
    deal2, other2 = fk.admin("GET", "records/deals/%s" % deal["id"]), fk.admin("GET", "records/contacts/%s" % other["id"])
    check(deal2["updatedAt"] == deal["updatedAt"] and other2["updatedAt"] == other["updatedAt"],
          "a new association bumps neither side's stamp")
    company = fk.truth("companies")[5]
    fk.admin("PUT", "associations", {"fromType": "contacts", "fromId": other["id"], "toType": "companies",
                                     "toId": company["id"], "typeId": 101})
    _, _, res = fk.get("/crm/v4/objects/companies/%s/associations/contacts" % company["id"])
    types = [t for r in res["results"] if str(r["toObjectId"]) == other["id"] for t in r["associationTypes"]]
    check({(t["typeId"], t["category"], t["label"]) for t in types}
          == {(102, "USER_DEFINED", "Former employee"), (280, "HUBSPOT_DEFINED", None)},
          "user-defined label, read from the other side")
    before = fk.admin("GET", "records/contacts/%s" % other["id"])
    time.sleep(0.01)
    fk.admin("PUT", "associations", {"fromType": "contacts", "fromId": other["id"], "toType": "companies",
                                     "toId": company["id"], "typeId": 1})
    after = fk.admin("GET", "records/contacts/%s" % other["id"])
    check(after["properties"]["associatedcompanyid"] == company["id"] and ms(after["updatedAt"]) > ms(before["updatedAt"]),
          "primary company is mirrored in associatedcompanyid (that bumps the contact)")

    lonely = fk.admin("POST", "records/contacts", {"properties": {"email": "lonely@example.com"}})
    status, _, res = fk.api("POST", "/crm/v4/associations/contacts/companies/batch/read",
                            {"inputs": [{"id": contact["id"]}, {"id": lonely["id"]}]})
    check(status == 207 and res["results"][0]["from"]["id"] == contact["id"]
          and res["errors"][0]["subCategory"] == "crm.associations.NO_ASSOCIATIONS_FOUND",
          "batch read: ids without associations are errors (207)")
    status, _, page = fk.get("/crm/v3/objects/p_cars?limit=5&associations=contacts")
    check(status == 200 and any("associations" in r for r in page["results"]), "custom object list with associations")


# The v3 rule as HubSpot's "Validating requests" page states it, written here independently of the fake.
V3_DECODED = {"%3A": ":", "%2F": "/", "%3F": "?", "%40": "@", "%21": "!", "%24": "$", "%27": "'", "%28": "(",
              "%29": ")", "%2A": "*", "%2C": ",", "%3B": ";"}


def verify_hubspot(req, secret, host, max_age_ms=300000):
    ts = req["headers"].get("X-HubSpot-Request-Timestamp", "")
    sig = req["headers"].get("X-HubSpot-Signature-v3", "")
    if not ts.isdigit() or abs(time.time() * 1000 - int(ts)) > max_age_ms:
        return False
    uri = "http://" + host + req["path"]
    for enc, dec in V3_DECODED.items():
        uri = uri.replace(enc, dec).replace(enc.lower(), dec)
    msg = (req["method"] + uri).encode("utf-8") + req["body"] + ts.encode()
    expected = base64.b64encode(hmac.new(secret.encode("utf-8"), msg, hashlib.sha256).digest()).decode()
    return hmac.compare_digest(expected, sig)


def hs_settle(fk, timeout=10):
    deadline = time.time() + timeout
    while fk.admin("GET", "webhooks")["pending"]:
        assert time.time() < deadline, "webhook deliveries did not settle"
        time.sleep(0.05)


def hs_events(reqs):
    return [e for r in reqs for e in json.loads(r["body"])]


def test_webhooks(fk):
    rec = WebhookReceiver()
    host = "127.0.0.1:%d" % rec.port
    url = rec.url + "?portal=a%3Ab%2Cc&x=%20y"
    try:
        check(fk.admin("GET", "webhook_target") is None, "no webhook target at first")
        target = fk.admin("POST", "webhook_target", {"url": url, "client_secret": "shh-secret"})
        check(target["url"] == url and target["max_batch"] == 100 and fk.admin("GET", "webhook_target") == target,
              "webhook target set and read back")
        t0 = time.time()
        c = fk.admin("POST", "records/contacts", {"properties": {"email": "hook@example.com", "firstname": "Hook"}})
        (req,) = rec.wait(1)
        (ev,) = json.loads(req["body"])
        check(req["method"] == "POST" and req["path"] == "/hook?portal=a%3Ab%2Cc&x=%20y"
              and req["headers"]["Content-Type"] == "application/json", "delivery POSTs JSON to the target URL as configured")
        check(verify_hubspot(req, "shh-secret", host) and not verify_hubspot(req, "test-secret", host)
              and abs(int(req["headers"]["X-HubSpot-Request-Timestamp"]) - t0 * 1000) < 5000,
              "X-HubSpot-Signature-v3 verifies (method + uri with %3A/%2C decoded + body + timestamp)")
        v1 = hashlib.sha256(b"shh-secret" + req["body"]).hexdigest()
        check(req["headers"]["X-HubSpot-Signature-Version"] == "v1" and req["headers"]["X-HubSpot-Signature"] == v1,
              "legacy X-HubSpot-Signature v1 = sha256(secret + body)")
        check(ev["subscriptionType"] == "contact.creation" and ev["objectId"] == int(c["id"]) and ev["attemptNumber"] == 0
              and ev["changeSource"] == "CRM_UI" and ev["portalId"] == 62515 and isinstance(ev["eventId"], int)
              and isinstance(ev["subscriptionId"], int) and isinstance(ev["appId"], int)
              and ev["occurredAt"] == ms(c["properties"]["createdate"]) and "propertyName" not in ev,
              "contact.creation event fields (occurredAt = createdate)")
        rec.clear()
        status, _, upd = fk.api("PATCH", "/crm/v3/objects/contacts/" + c["id"],
                                {"properties": {"firstname": "Hooked", "lastname": "Ünïcode"}})
        (req,) = rec.wait(1)
        time.sleep(0.2)
        evs = json.loads(req["body"])
        by = {e["propertyName"]: e for e in evs}
        check(status == 200 and len(rec.requests) == 1 and set(by) == {"firstname", "lastname", "lastmodifieddate"}
              and all(e["subscriptionType"] == "contact.propertyChange" and e["changeSource"] == "API"
                      and e["objectId"] == int(c["id"]) for e in evs)
              and by["firstname"]["propertyValue"] == "Hooked" and by["lastname"]["propertyValue"] == "Ünïcode"
              and by["lastmodifieddate"]["propertyValue"] == upd["properties"]["lastmodifieddate"]
              and by["firstname"]["occurredAt"] == ms(upd["properties"]["lastmodifieddate"])
              and len({e["eventId"] for e in evs}) == 3 and verify_hubspot(req, "shh-secret", host),
              "API PATCH: one propertyChange per changed property (API source), batched in one signed POST")

        # Batching: a bulk update is one delivery; max_batch splits it.
        ids = [x["id"] for x in fk.truth("contacts")[:5]]
        rec.clear()
        fk.admin("POST", "bulk_update/contacts", {"ids": ids, "properties": {"jobtitle": "Batched"}})
        rec.wait(1)
        hs_settle(fk)
        evs = hs_events(rec.requests)
        check(len(rec.requests) == 1 and {e["objectId"] for e in evs} == {int(i) for i in ids}
              and {e["propertyName"] for e in evs} == {"jobtitle", "lastmodifieddate"},
              "bulk update of 5 contacts: one POST with all their events")
        fk.admin("POST", "webhook_target", {"url": url, "client_secret": "shh-secret", "max_batch": 4})
        rec.clear()
        fk.admin("POST", "bulk_update/contacts", {"ids": ids, "properties": {"jobtitle": "Split"}})
        hs_settle(fk)
        check([len(json.loads(r["body"])) for r in rec.requests] == [4, 4, 2], "max_batch 4: 10 events in 3 POSTs")
        fk.admin("POST", "webhook_target", {"url": url, "client_secret": "shh-secret",
                                            "property_names": ["firstname"]})
        rec.clear()
        fk.admin("PATCH", "records/contacts/" + c["id"], {"properties": {"firstname": "Only", "lastname": "Not"}})
        hs_settle(fk)
        check([(e["propertyName"], e["propertyValue"]) for e in hs_events(rec.requests)] == [("firstname", "Only")],
              "property_names filter: propertyChange only for subscribed properties")
        fk.admin("POST", "webhook_target", {"url": url, "client_secret": "shh-secret"})

        # Deletion, restore, privacy deletion, merge; companies and deals; no custom objects.
        rec.clear()
        status, _, _ = fk.api("DELETE", "/crm/v3/objects/contacts/" + c["id"])
        hs_settle(fk)
        (ev,) = hs_events(rec.requests)
        check(status == 204 and ev["subscriptionType"] == "contact.deletion" and ev["changeSource"] == "API"
              and ev["objectId"] == int(c["id"]), "API archive -> contact.deletion")
        rec.clear()
        fk.admin("POST", "restore/contacts/" + c["id"])
        fk.admin("DELETE", "records/contacts/%s?hard=1" % c["id"])
        comp = fk.truth("companies")[0]
        fk.admin("DELETE", "records/companies/" + comp["id"])
        deal = fk.admin("POST", "records/deals", {"properties": {"dealname": "Hooked deal"}})
        fk.admin("POST", "records/cars", {"properties": {}})
        hs_settle(fk)
        got = [(e["subscriptionType"], e["objectId"]) for e in hs_events(rec.requests)]
        check(got == [("contact.restore", int(c["id"])), ("contact.privacyDeletion", int(c["id"])),
                      ("company.deletion", int(comp["id"])), ("deal.creation", int(deal["id"]))],
              "restore, hard delete (privacyDeletion), company.deletion, deal.creation; custom object: none")
        rec.clear()
        a, b = fk.truth("contacts")[30:32]
        merged = fk.admin("POST", "merge/contacts", {"primaryObjectId": a["id"], "objectIdToMerge": b["id"]})
        hs_settle(fk)
        (ev,) = hs_events(rec.requests)
        check(ev["subscriptionType"] == "contact.merge" and ev["objectId"] == int(merged["id"])
              and ev["primaryObjectId"] == int(a["id"]) and ev["mergedObjectIds"] == [int(b["id"])]
              and ev["newObjectId"] == int(merged["id"]), "merge -> one contact.merge event")

        # Hold: dropped; the change is still readable (polling stays the truth).
        rec.clear()
        fk.admin("POST", "webhooks/hold", {"hold": True})
        fk.admin("PATCH", "records/contacts/" + a["id"], {"properties": {"firstname": "Unheard"}})
        time.sleep(0.3)
        log = fk.admin("GET", "webhook_deliveries")
        check(rec.requests == [] and log[0]["status"] == "dropped" and fk.admin("GET", "webhooks")["held"] is True
              and fk.get("/crm/v3/objects/contacts/%s?properties=firstname" % merged["id"])[2]["properties"]
              ["firstname"] == "Unheard", "held: nothing arrives, logged dropped; the API shows the change")
        fk.admin("POST", "webhooks/hold", {"hold": False})

        # Retries keep the eventIds, count attemptNumber up and re-sign; a 4xx is not retried.
        rec.clear()
        rec.script.extend([500, 503])
        t1 = time.time()
        fk.admin("PATCH", "records/deals/" + deal["id"], {"properties": {"dealname": "Retried"}})
        reqs = rec.wait(3)
        bodies = [json.loads(r["body"]) for r in reqs]
        check([{e["attemptNumber"] for e in b} for b in bodies] == [{0}, {1}, {2}]
              and len({tuple(e["eventId"] for e in b) for b in bodies}) == 1
              and all(verify_hubspot(r, "shh-secret", host) for r in reqs) and reqs[2]["t"] - t1 >= 0.6,
              "500, 503: retried after 0.2 s and 0.5 s, same eventIds, attemptNumber 0, 1, 2, each signed")
        hs_settle(fk)
        rec.clear()
        rec.script.append(400)
        fk.admin("PATCH", "records/deals/" + deal["id"], {"properties": {"dealname": "Refused"}})
        hs_settle(fk)
        time.sleep(0.3)
        log = fk.admin("GET", "webhook_deliveries")
        check(len(rec.requests) == 1 and log[0]["status"] == 400 and log[0]["attempt"] == 1
              and isinstance(log[0]["event_ids"], list), "400: not retried (HubSpot retries only 5xx/429/failures)")

        # Crafted deliveries.
        rec.clear()
        r = fk.admin("POST", "webhooks/send", {"timestamp": int(time.time() * 1000) - 600000})
        (req,) = rec.wait(1)
        check(r["status"] == 200 and not verify_hubspot(req, "shh-secret", host)
              and verify_hubspot(req, "shh-secret", host, max_age_ms=700000),
              "send: stale timestamp, correctly signed")
        r = fk.admin("POST", "webhooks/send", {"body": "[]", "signature": "AAAA"})
        check(rec.wait(2)[1]["headers"]["X-HubSpot-Signature-v3"] == "AAAA" and rec.requests[1]["body"] == b"[]",
              "send: raw body and signature override")

        fk.admin("DELETE", "webhook_target")
        rec.clear()
        fk.admin("PATCH", "records/deals/" + deal["id"], {"properties": {"dealname": "Silent"}})
        time.sleep(0.3)
        check(rec.requests == [] and fk.admin("GET", "webhook_target") is None, "no target, no deliveries")
    finally:
        rec.stop()


def test_faults_log(fk):
    fk.admin("DELETE", "requests")
    fk.admin("POST", "faults", {"path_regex": "/crm/v3/objects/companies", "status": 502, "count": 2})
    codes = [fk.get("/crm/v3/objects/companies?limit=1")[0] for _ in range(3)]
    check(codes == [502, 502, 200], "502 fault twice, then normal")
    fk.admin("POST", "faults", {"path_regex": "/crm/v3/objects/deals", "drop": True})
    try:
        fk.get("/crm/v3/objects/deals?limit=1")
        dropped = False
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError):
        dropped = True
    check(dropped, "drop fault closes the connection")
    fk.search("deals", {"limit": 1})
    log = fk.admin("GET", "requests")
    check(log and {"t", "method", "path", "query", "status"} <= set(log[0]) and log[-1]["body"] == {"limit": 1},
          "request log (with search bodies)")


def test_keepalive_speed(fk):
    conn = http.client.HTTPConnection("127.0.0.1", fk.port, timeout=30)
    path = "/crm/v3/objects/contacts?limit=100&properties=" + all_props(fk, "contacts")
    t0 = time.time()
    for _ in range(5):
        conn.request("GET", path, headers={"Authorization": "Bearer " + PAT, "Accept-Encoding": "gzip"})
        resp = conn.getresponse()
        body = json.loads(gzip.decompress(resp.read()))
        assert resp.status == 200 and len(body["results"]) == 100
    per_page = (time.time() - t0) / 5
    check(per_page < 0.5, "5 full-width 100-record pages on one keep-alive connection, %.0f ms/page" % (per_page * 1000))
    conn.close()


def main():
    fk = Fake("--contacts", "10300", "--companies", "60", "--deals", "120", "--cars", "20",
              "--archived", "5", "--seed", "3", "--burst-limit", "100000", "--search-lag", "0")
    try:
        test_auth(fk)
        test_properties(fk)
        test_string_values(fk)
        test_list_paging(fk)
        test_archived(fk)
        test_search(fk)
        test_result_cap(fk)
        test_search_lag(fk)
        test_rate_limits(fk)
        test_merge(fk)
        test_associations(fk)
        test_webhooks(fk)
        test_faults_log(fk)
        test_fault_kinds(fk, "/crm/v3/objects/contacts?limit=20&properties=firstname,lastname,email,"
                         "hs_object_id,lastmodifieddate,num_notes", {"Authorization": "Bearer " + PAT},
                         r"^/crm/v3/objects/contacts\?limit=20", lambda d: [r["properties"] for r in d["results"]],
                         {"hs_object_id"}, "hubspot", "/crm/v3/objects/contacts?limit=20&after=999999999")
        test_keepalive_speed(fk)
    finally:
        fk.stop()
    print("all fake_hubspot self-tests passed")


if __name__ == "__main__":
    main()
