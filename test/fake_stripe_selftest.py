#!/usr/bin/python3
"""Self-test for test/fake_stripe.py (stdlib only).

Run: /usr/bin/python3 test/fake_stripe_selftest.py
Starts the fake on a free port (twice: once with rate limits off for the functional
checks, once with Stripe's sandbox defaults for the 429 check), exercises the
behaviours the sync test suite relies on, and exits non-zero on the first failure.
"""

import base64
import hashlib
import hmac
import http.client
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
KEY = "sk_test_51SyncFakeStripeKey0000000000000000000000abcd"


class Fake:
    def __init__(self, *args):
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "fake_stripe.py"), "--port", "0"]
                                     + list(args), stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("listening on "), line
        self.port = int(line.split()[2])
        self.base = "http://127.0.0.1:%d" % self.port

    def stop(self):
        self.proc.terminate()
        self.proc.wait(5)

    def call(self, method, path, body=None, headers=None):
        """(status, headers, parsed JSON body)."""
        data, hdrs = None, dict(headers or {})
        if body is not None:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                status, rh, payload = resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as e:
            status, rh, payload = e.code, e.headers, e.read()
        return status, rh, json.loads(payload) if payload else None

    def admin(self, method, path, body=None):
        status, _, payload = self.call(method, "/__admin/" + path, body=body)
        assert status in (200, 201), (method, path, status, payload)
        return payload

    def form(self, method, path, fields, key=KEY):
        """A form-encoded write to the public API: (status, headers, JSON)."""
        data = urllib.parse.urlencode(fields).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Authorization": "Bearer " + key,
                                              "Content-Type": "application/x-www-form-urlencoded"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, resp.headers, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, e.headers, json.loads(e.read())

    def api(self, path, key=KEY, headers=None):
        h = {"Authorization": "Bearer " + key} if key else {}
        h.update(headers or {})
        return self.call("GET", path, headers=h)

    def walk(self, path, limit, direction="starting_after"):
        """Follow a list to its end; returns the ids in the order the pages gave them."""
        sep = "&" if "?" in path else "?"
        ids, cursor = [], None
        while True:
            url = "%s%slimit=%d" % (path, sep, limit) + ("&%s=%s" % (direction, cursor) if cursor else "")
            status, _, page = self.api(url)
            assert status == 200, page
            assert page["object"] == "list" and page["url"] == path.split("?")[0]
            if direction == "starting_after":
                ids += [o["id"] for o in page["data"]]
                cursor = page["data"][-1]["id"] if page["data"] else None
            else:
                ids = [o["id"] for o in page["data"]] + ids
                cursor = page["data"][0]["id"] if page["data"] else None
            if not page["has_more"]:
                return ids


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok -", what)


def newest_first(objs):
    return sorted(objs, key=lambda o: (o["created"], o["id"]), reverse=True)


# ----------------------------------------------------------------------------

def test_auth(fk):
    status, h, err = fk.api("/v1/customers", key=None)
    check(status == 401 and err["error"]["type"] == "invalid_request_error"
          and err["error"]["message"].startswith("You did not provide an API key.")
          and h["Request-Id"].startswith("req_"), "missing key -> 401 with Request-Id")
    status, _, err = fk.api("/v1/customers", key="sk_test_0123456789wxyz")      # 14 characters after sk_test_
    check(status == 401 and err["error"]["message"] == "Invalid API Key provided: sk_test_**********wxyz"
          and "code" not in err["error"], "wrong key -> 401, key masked like Stripe")
    basic = base64.b64encode((KEY + ":").encode()).decode()
    status, h, page = fk.call("GET", "/v1/customers?limit=1", headers={"Authorization": "Basic " + basic})
    check(status == 200 and h["Stripe-Version"] == "2024-06-20" and h["Request-Id"].startswith("req_"),
          "HTTP Basic with the key as user works; Stripe-Version and Request-Id headers")
    status, h, _ = fk.api("/v1/customers?limit=1", headers={"Stripe-Version": "2023-10-16"})
    check(status == 200 and h["Stripe-Version"] == "2023-10-16", "Stripe-Version echoed")

    rk = fk.admin("POST", "keys", {"restricted": True, "permissions": ["customers"]})["key"]
    check(fk.api("/v1/customers?limit=1", key=rk)[0] == 200, "restricted key reads what it was granted")
    status, _, err = fk.api("/v1/charges", key=rk)
    check(status == 403 and "rak_charge_read" in err["error"]["message"]
          and "rk_test_" + "*" in err["error"]["message"], "restricted key without permission -> 403")
    fk.admin("POST", "keys/%s/expire" % rk)
    status, _, err = fk.api("/v1/customers", key=rk)
    check(status == 401 and err["error"]["code"] == "api_key_expired"
          and err["error"]["message"].startswith("Expired API Key provided: rk_test_"), "expired key -> 401")
    sk = fk.admin("POST", "keys", {})["key"]
    check(fk.api("/v1/customers?limit=1", key=sk)[0] == 200, "second secret key works")
    fk.admin("DELETE", "keys/" + sk)
    status, _, err = fk.api("/v1/customers", key=sk)
    check(status == 401 and err["error"]["message"].startswith("Invalid API Key provided"), "revoked key -> 401")


def test_params(fk):
    status, _, page = fk.api("/v1/customers")
    check(status == 200 and len(page["data"]) == 10 and page["has_more"] is True, "default limit is 10")
    for value, fragment in [("0", "greater than or equal to 1"), ("101", "less than or equal to 100"),
                            ("abc", "Invalid integer: abc")]:
        status, _, err = fk.api("/v1/customers?limit=" + value)
        check(status == 400 and err["error"]["param"] == "limit" and fragment in err["error"]["message"],
              "limit=%s -> 400 param limit" % value)
    check(len(fk.api("/v1/customers?limit=100")[2]["data"]) == 100, "limit=100 accepted")
    status, _, err = fk.api("/v1/customers?starting_after=cus_nope")
    check(status == 400 and err["error"]["code"] == "resource_missing"
          and err["error"]["message"] == "No such customer: 'cus_nope'"
          and err["error"]["param"] == "starting_after", "unknown starting_after -> 400 resource_missing")
    status, _, err = fk.api("/v1/customers?foo=1")
    check(status == 400 and err["error"]["message"] == "Received unknown parameter: foo", "unknown parameter")
    status, _, err = fk.api("/v1/customers?starting_after=a&ending_before=b")
    check(status == 400 and "only specify one" in err["error"]["message"], "both cursors -> 400")
    status, _, err = fk.api("/v1/customers?starting_after=")
    check(status == 400 and "empty string" in err["error"]["message"], "empty cursor -> 400")


def test_pagination(fk):
    truth = newest_first(fk.admin("GET", "objects/customers"))
    seconds = {}
    for c in truth:
        seconds[c["created"]] = seconds.get(c["created"], 0) + 1
    check(max(seconds.values()) > 100, "seed has %d customers sharing one created second" % max(seconds.values()))
    for limit in (7, 100):
        ids = fk.walk("/v1/customers", limit)
        check(ids == [c["id"] for c in truth] and len(set(ids)) == len(ids),
              "starting_after walk, limit=%d: every customer exactly once, newest first (ties by id)" % limit)
    # ending_before from the oldest object walks back up to the newest.
    oldest = truth[-1]["id"]
    ids, cursor = [], oldest
    while True:
        page = fk.api("/v1/customers?limit=13&ending_before=" + cursor)[2]
        ids = [o["id"] for o in page["data"]] + ids
        if not page["has_more"]:
            break
        cursor = page["data"][0]["id"]
    check(ids == [c["id"] for c in truth[:-1]], "ending_before walk returns the rest, in order")
    burst = max(seconds, key=seconds.get)
    got = fk.walk("/v1/customers?created[gte]=%d&created[lte]=%d" % (burst, burst), 100)
    check(got == [c["id"] for c in truth if c["created"] == burst], "created[gte]/[lte] select one second")
    got = fk.walk("/v1/customers?created=%d" % burst, 100)
    check(len(got) == seconds[burst], "created=ts exact")
    check(fk.api("/v1/customers?created[gt]=abc")[0] == 400, "created[gt]=abc -> 400")


def test_objects(fk):
    deleted = [c for c in fk.admin("GET", "objects/customers?include_deleted=1") if c.get("_deleted")]
    listed = set(fk.walk("/v1/customers", 100))
    check(deleted and not listed & {c["id"] for c in deleted}, "deleted customers are not listed")
    status, _, body = fk.api("/v1/customers/" + deleted[0]["id"])
    check(status == 200 and body == {"id": deleted[0]["id"], "object": "customer", "deleted": True},
          "deleted customer retrieve -> {id, object, deleted: true}")
    status, _, err = fk.api("/v1/customers/cus_nope")
    check(status == 404 and err["error"]["code"] == "resource_missing" and err["error"]["param"] == "id",
          "unknown customer -> 404 resource_missing")

    subs = fk.admin("GET", "objects/subscriptions")
    canceled = {s["id"] for s in subs if s["status"] == "canceled"}
    default = set(fk.walk("/v1/subscriptions", 100))
    every = set(fk.walk("/v1/subscriptions?status=all", 100))
    check(canceled and not default & canceled and every == {s["id"] for s in subs},
          "subscriptions list hides canceled unless status=all")
    check(set(fk.walk("/v1/subscriptions?status=canceled", 100)) == canceled, "status=canceled")
    check(fk.api("/v1/subscriptions?status=bogus")[0] == 400, "bad status -> 400")

    sub = fk.api("/v1/subscriptions?limit=1")[2]["data"][0]
    check(sub["id"].startswith("sub_") and sub["items"]["object"] == "list" and sub["livemode"] is False
          and sub["items"]["url"] == "/v1/subscription_items?subscription=" + sub["id"]
          and sub["items"]["data"][0]["price"]["object"] == "price", "subscription items sub-list")
    invs = fk.admin("GET", "objects/invoices")
    big = [i for i in invs if i["lines"]["total_count"] > 10][0]
    check(len(big["lines"]["data"]) == 10 and big["lines"]["has_more"] is True, "invoice lines truncated at 10")
    lines = fk.walk("/v1/invoices/%s/lines" % big["id"], 4)
    check(len(lines) == big["lines"]["total_count"] and lines[:10] == [x["id"] for x in big["lines"]["data"]],
          "/v1/invoices/{id}/lines pages the full line list")

    page = fk.api("/v1/charges?limit=5&expand[]=data.customer")[2]
    custs = [c["customer"] for c in page["data"] if c["customer"] is not None]
    check(custs and all(isinstance(c, dict) and c["object"] == "customer" for c in custs), "expand[]=data.customer")
    ch = page["data"][0]["id"]
    status, _, body = fk.api("/v1/charges/%s?expand[]=payment_intent" % ch)
    check(status == 200 and (body["payment_intent"] is None or body["payment_intent"]["object"] == "payment_intent"),
          "expand on retrieve")
    status, _, err = fk.api("/v1/charges?expand[]=data.nope")
    check(status == 400 and "cannot be expanded" in err["error"]["message"], "unexpandable -> 400")
    prefixes = {"customers": "cus_", "charges": "ch_", "invoices": "in_", "subscriptions": "sub_",
                "products": "prod_", "prices": "price_", "payment_intents": "pi_"}
    for kind, prefix in prefixes.items():
        data = fk.api("/v1/%s?limit=3" % kind)[2]["data"]
        check(data and all(o["id"].startswith(prefix) and isinstance(o["created"], int) for o in data),
              "%s: ids %s..., integer created" % (kind, prefix))


def events_since(fk, cursor, query="", limit=2):
    """Walk forward from an event cursor the way sync does: ending_before pages, each
    page applied oldest first. Returns the events oldest first."""
    out = []
    while True:
        status, _, page = fk.api("/v1/events?limit=%d&ending_before=%s%s" % (limit, cursor, query))
        assert status == 200, page
        out += list(reversed(page["data"]))
        if page["data"]:
            cursor = page["data"][0]["id"]
        if not page["has_more"]:
            return out, cursor


def test_events(fk):
    fk.admin("POST", "clock", {"freeze": True})
    cust = fk.admin("POST", "objects/customers", {"email": "first@example.com", "metadata": {"a": "1"}})
    fk.admin("PATCH", "objects/customers/" + cust["id"], {"email": "second@example.com", "metadata": {"b": "2"}})
    fk.admin("POST", "clock", {"advance": 1})
    fk.admin("PATCH", "objects/customers/" + cust["id"], {"name": "Renamed"})
    fk.admin("DELETE", "objects/customers/" + cust["id"])
    fk.admin("POST", "clock", {"freeze": False})

    page = fk.api("/v1/events?type=customer.*&limit=10")[2]
    mine = [e for e in page["data"] if e["data"]["object"]["id"] == cust["id"]]
    check([e["type"] for e in mine] == ["customer.deleted", "customer.updated", "customer.updated",
                                        "customer.created"], "create/update/update/delete listed newest first")
    created, upd1, upd2, deleted = reversed(mine)
    check(created["created"] == upd1["created"] and upd2["created"] == created["created"] + 1,
          "created + first update share one second; list order still puts the update first")
    check(created["data"]["object"]["email"] == "first@example.com" and "previous_attributes" not in created["data"],
          "customer.created snapshot is the object at creation")
    check(upd1["data"]["object"]["email"] == "second@example.com"
          and upd1["data"]["previous_attributes"] == {"email": "first@example.com", "metadata": {"b": None}},
          "customer.updated has the new snapshot and previous_attributes")
    check(deleted["data"]["object"]["name"] == "Renamed" and "deleted" not in deleted["data"]["object"],
          "customer.deleted carries the full object as it was")
    check(all(e["id"].startswith("evt_") and e["object"] == "event" and e["api_version"] == "2024-06-20"
              and e["livemode"] is False and e["pending_webhooks"] == 0 and e["request"]["id"].startswith("req_")
              for e in mine), "event envelope fields")
    status, _, one = fk.api("/v1/events/" + deleted["id"])
    check(status == 200 and one == deleted, "retrieve an event")

    # The cursor dance sync does: newest event id, then walk forward with ending_before.
    cursor = fk.api("/v1/events?limit=1")[2]["data"][0]["id"]
    fk.admin("POST", "clock", {"freeze": True})
    prod = fk.admin("POST", "objects/products", {"name": "Widget"})
    price = fk.admin("POST", "objects/prices", {"product": prod["id"], "unit_amount": 700})
    inv = fk.admin("POST", "objects/invoices", {"customer": fk.admin("GET", "objects/customers")[0]["id"]})
    fk.admin("PATCH", "objects/invoices/" + inv["id"], {"status": "paid"})
    sub = fk.admin("POST", "objects/subscriptions", {"price": price["id"], "status": "active"})
    fk.admin("DELETE", "objects/subscriptions/" + sub["id"])
    fk.admin("POST", "clock", {"freeze": False})
    got, cursor = events_since(fk, cursor)
    check([e["type"] for e in got] == ["product.created", "price.created", "invoice.created", "invoice.updated",
                                       "invoice.finalized", "invoice.paid", "invoice.payment_succeeded",
                                       "customer.subscription.created", "customer.subscription.deleted"],
          "ending_before walk (limit 2) returns same-second events in emission order")
    paid = [e for e in got if e["type"] == "invoice.paid"][0]
    check(paid["data"]["object"]["status"] == "paid" and paid["data"]["previous_attributes"]["status"] == "draft",
          "invoice.paid snapshot and previous_attributes")
    status, _, canceled = fk.api("/v1/subscriptions/" + sub["id"])
    check(status == 200 and canceled["status"] == "canceled" and canceled["canceled_at"], "canceled sub retrievable")
    check(events_since(fk, cursor)[0] == [], "nothing newer than the cursor")
    types = fk.api("/v1/events?types[]=price.created&types[]=product.created&limit=5")[2]["data"]
    check([e["type"] for e in types][:2] == ["price.created", "product.created"], "types[] filter")
    check(fk.api("/v1/events?type=a&types[]=b")[0] == 400, "type and types together -> 400")
    pi = fk.admin("POST", "objects/payment_intents", {"status": "requires_payment_method"})
    before = fk.api("/v1/events?limit=1")[2]["data"][0]["id"]
    fk.admin("PATCH", "objects/payment_intents/" + pi["id"], {"metadata": {"x": "y"}})
    check(events_since(fk, before)[0] == [], "PaymentIntent metadata change emits no event (no payment_intent.updated)")
    fk.admin("PATCH", "objects/payment_intents/" + pi["id"], {"status": "succeeded"})
    check([e["type"] for e in events_since(fk, before)[0]] == ["payment_intent.succeeded"], "payment_intent.succeeded")
    ids = fk.admin("POST", "bulk/customers", {"count": 120})["ids"]
    got = events_since(fk, before, "&type=customer.created", limit=100)[0]
    check([e["data"]["object"]["id"] for e in got] == ids and len({e["created"] for e in got}) == 1,
          "bulk: 120 customer.created in one second, in emission order, across pages")


def verify_stripe(req, secret, tolerance=300):
    """The receiver side, written from Stripe's docs (independent of the fake): the t and every v1
    of Stripe-Signature, HMAC-SHA256 over '<t>.<raw body>' keyed by the whsec_ string."""
    header = req["headers"].get("Stripe-Signature", "")
    items = [kv.split("=", 1) for kv in header.split(",") if "=" in kv]
    ts = [v for k, v in items if k == "t"]
    v1 = [v for k, v in items if k == "v1"]
    if len(ts) != 1 or not v1:
        return False
    expected = hmac.new(secret.encode("utf-8"), ts[0].encode() + b"." + req["body"], hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, v) for v in v1) and abs(time.time() - int(ts[0])) <= tolerance


def deliveries_of(fk, evt_id):
    return [d for d in fk.admin("GET", "webhook_deliveries") if d.get("event_id") == evt_id]


def settle(fk, timeout=10):
    deadline = time.time() + timeout
    while fk.admin("GET", "webhooks")["pending"]:
        assert time.time() < deadline, "webhook deliveries did not settle"
        time.sleep(0.05)


def test_webhooks(fk):
    ra, rb = WebhookReceiver(), WebhookReceiver()
    try:
        ep_a = fk.admin("POST", "webhook_endpoints", {"url": ra.url, "enabled_events": ["customer.created",
                                                                                       "customer.updated"]})
        check(ep_a["id"].startswith("we_") and ep_a["secret"].startswith("whsec_") and ep_a["status"] == "enabled"
              and ep_a["enabled_events"] == ["customer.created", "customer.updated"] and ep_a["url"] == ra.url,
              "admin webhook endpoint: we_ id, whsec_ secret")
        status, _, ep_b = fk.form("POST", "/v1/webhook_endpoints", [("url", rb.url), ("enabled_events[]", "*"),
                                                                    ("description", "all")])
        check(status == 200 and ep_b["object"] == "webhook_endpoint" and ep_b["secret"].startswith("whsec_")
              and ep_b["enabled_events"] == ["*"] and ep_b["livemode"] is False and ep_b["description"] == "all",
              "POST /v1/webhook_endpoints (form) -> endpoint with its secret")
        status, _, got = fk.api("/v1/webhook_endpoints/" + ep_b["id"])
        check(status == 200 and "secret" not in got and got["url"] == rb.url, "retrieve: no secret after creation")
        status, _, page = fk.api("/v1/webhook_endpoints?limit=1")
        check(status == 200 and page["object"] == "list" and page["has_more"] is True
              and page["data"][0]["id"] == ep_b["id"] and "secret" not in page["data"][0], "list: newest first")
        status, _, err = fk.form("POST", "/v1/webhook_endpoints", [("enabled_events[]", "*")])
        check(status == 400 and err["error"]["param"] == "url", "POST without url -> 400 param url")
        status, _, err = fk.api("/v1/webhook_endpoints/we_nope")
        check(status == 404 and err["error"]["code"] == "resource_missing", "unknown endpoint -> 404")
        check(fk.form("POST", "/v1/customers", [("email", "x@example.com")])[0] == 404,
              "other writes stay unrecognized (read-only API)")

        t0 = time.time()
        cust = fk.admin("POST", "objects/customers", {"email": "hook@example.com"})
        evt = fk.admin("GET", "events?type=customer.created")[0]
        check(evt["data"]["object"]["id"] == cust["id"], "customer.created emitted")
        (ra_req,), (rb_req,) = ra.wait(1), rb.wait(1)
        check(ra_req["path"] == "/hook" and ra_req["method"] == "POST"
              and ra_req["headers"]["Content-Type"] == "application/json; charset=utf-8"
              and ra_req["headers"]["User-Agent"] == "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
              "delivery: POST, Content-Type and User-Agent as Stripe sends them")
        check(verify_stripe(ra_req, ep_a["secret"]) and verify_stripe(rb_req, ep_b["secret"])
              and not verify_stripe(ra_req, ep_b["secret"]), "Stripe-Signature v1 verifies with each endpoint's secret")
        sig = dict(kv.split("=", 1) for kv in ra_req["headers"]["Stripe-Signature"].split(","))
        check(set(sig) == {"t", "v1", "v0"} and abs(int(sig["t"]) - t0) <= 5,
              "Stripe-Signature: t (wall clock), v1, v0 (test mode)")
        settle(fk)
        status, _, api_evt = fk.api("/v1/events/" + evt["id"])
        body = json.loads(ra_req["body"])
        check(api_evt["pending_webhooks"] == 0 and body["pending_webhooks"] in (1, 2)
              and dict(body, pending_webhooks=0) == api_evt and list(body) == list(api_evt),
              "body is the event as GET /v1/events/{id} returns it; pending_webhooks 0 once both acknowledged")
        d = deliveries_of(fk, evt["id"])
        check(len(d) == 2 and {x["endpoint_id"] for x in d} == {ep_a["id"], ep_b["id"]}
              and all(x["status"] == 200 and x["attempt"] == 1 and x["type"] == "customer.created" for x in d),
              "deliveries log: one 200 per endpoint")

        ra.clear(), rb.clear()
        fk.admin("POST", "objects/products", {"name": "Hooked"})
        rb.wait(1)
        settle(fk)
        check(json.loads(rb.requests[0]["body"])["type"] == "product.created" and ra.requests == [],
              "enabled_events filters: product.created only to the '*' endpoint")

        # Hold: deliveries are dropped, the events stay pollable.
        ra.clear(), rb.clear()
        check(fk.admin("POST", "webhooks/hold", {"hold": True}) == {"held": True}, "hold on")
        fk.admin("PATCH", "objects/customers/" + cust["id"], {"name": "Held"})
        held = fk.admin("GET", "events?type=customer.updated")[0]
        time.sleep(0.4)
        d = deliveries_of(fk, held["id"])
        check(ra.requests == [] and rb.requests == [] and len(d) == 2 and all(x["status"] == "dropped" for x in d),
              "held: nothing arrives, deliveries logged as dropped")
        ids = [e["id"] for e in fk.api("/v1/events?delivery_success=false&limit=5")[2]["data"]]
        check(held["id"] in ids and fk.api("/v1/events/" + held["id"])[2]["pending_webhooks"] == 2,
              "the dropped event is still listed (polling is the truth), pending_webhooks 2")
        fk.admin("POST", "webhooks/hold", {"hold": False})

        # Retries: 500, 500, then 200.
        ra.clear(), rb.clear()
        ra.script.extend([500, 500])
        t1 = time.time()
        fk.admin("PATCH", "objects/customers/" + cust["id"], {"name": "Retried"})
        reqs = ra.wait(3)
        retried = fk.admin("GET", "events?type=customer.updated")[0]
        check(all(json.loads(r["body"])["id"] == retried["id"] and verify_stripe(r, ep_a["secret"]) for r in reqs)
              and reqs[2]["t"] - t1 >= 0.6, "500, 500: retried with backoff (0.2 s, 0.5 s), each attempt signed")
        settle(fk)
        d = [x for x in deliveries_of(fk, retried["id"]) if x["endpoint_id"] == ep_a["id"]]
        check([(x["attempt"], x["status"]) for x in d] == [(3, 200), (2, 500), (1, 500)],
              "deliveries log newest first: attempts 1, 2 (500) and 3 (200)")

        # A dead endpoint: connection refused, retried, given up.
        fk.admin("POST", "webhooks/config", {"retry_delays": [0.05, 0.05]})
        dead = WebhookReceiver()
        dead_url = dead.url
        dead.stop()
        ep_d = fk.admin("POST", "webhook_endpoints", {"url": dead_url, "enabled_events": ["*"]})
        fk.admin("POST", "objects/products", {"name": "Nobody home"})
        settle(fk)
        d = [x for x in fk.admin("GET", "webhook_deliveries") if x["endpoint_id"] == ep_d["id"]]
        check([x["attempt"] for x in d] == [3, 2, 1] and all(x["status"].startswith("error: ") for x in d),
              "refused connection: 'error: ...' per attempt, given up after 1 + len(retry_delays)")
        fk.admin("DELETE", "webhook_endpoints/" + ep_d["id"])
        fk.admin("POST", "webhooks/config", {"retry_delays": [0.2, 0.5, 1.0]})

        # Never blocking the change: a receiver that hangs past the timeout.
        ra.clear(), rb.clear()
        ra.script.append("hang")
        t2 = time.time()
        fk.admin("PATCH", "objects/customers/" + cust["id"], {"name": "Slow"})
        check(time.time() - t2 < 0.5, "the write returns at once while the receiver hangs")
        ra.wait(2, timeout=8)
        settle(fk)
        slow = fk.admin("GET", "events?type=customer.updated")[0]
        d = [x for x in deliveries_of(fk, slow["id"]) if x["endpoint_id"] == ep_a["id"]]
        check([x["attempt"] for x in d] == [2, 1] and d[1]["status"].startswith("error: ") and d[0]["status"] == 200,
              "timeout (2 s) counts as a failure and is retried")

        # Crafted deliveries for the receiver's negative tests.
        ra.clear()
        r = fk.admin("POST", "webhooks/send", {"endpoint_id": ep_a["id"], "event_id": evt["id"],
                                                "timestamp": int(time.time()) - 600})
        (req,) = ra.wait(1)
        check(r["status"] == 200 and r["response_body"] == '{"received":true}' and req["body"] == r["body"].encode()
              and not verify_stripe(req, ep_a["secret"]) and verify_stripe(req, ep_a["secret"], tolerance=700)
              and json.loads(req["body"])["id"] == evt["id"],
              "send: stale timestamp (signed correctly, outside the 300 s tolerance)")
        r = fk.admin("POST", "webhooks/send", {"url": ra.url, "body": '{"id":"evt_forged"}', "secret": "whsec_wrong"})
        check(not verify_stripe(ra.wait(2)[1], ep_a["secret"]) and r["headers"]["Stripe-Signature"].startswith("t="),
              "send: wrong secret")
        r = fk.admin("POST", "webhooks/send", {"url": ra.url, "body": "{}", "signature": "t=1,v1=00"})
        check(ra.wait(3)[2]["headers"]["Stripe-Signature"] == "t=1,v1=00", "send: signature header override")
        ra.script.append(400)
        r = fk.admin("POST", "webhooks/send", {"endpoint_id": ep_a["id"]})
        check(r["status"] == 400 and fk.admin("GET", "webhook_deliveries")[0]["crafted"] is True,
              "send: the receiver's answer comes back; logged as crafted")

        # Deleting endpoints stops deliveries.
        status, _, gone = fk.form("DELETE", "/v1/webhook_endpoints/" + ep_b["id"], [])
        check(status == 200 and gone == {"id": ep_b["id"], "object": "webhook_endpoint", "deleted": True},
              "DELETE /v1/webhook_endpoints/{id}")
        fk.admin("DELETE", "webhook_endpoints/" + ep_a["id"])
        ra.clear(), rb.clear()
        fk.admin("PATCH", "objects/customers/" + cust["id"], {"name": "Unheard"})
        time.sleep(0.3)
        check(ra.requests == [] and rb.requests == [] and fk.admin("GET", "webhook_endpoints") == [],
              "no endpoints, no deliveries")
        check(fk.admin("DELETE", "webhook_deliveries")["cleared"] > 0 and fk.admin("GET", "webhook_deliveries") == [],
              "DELETE /__admin/webhook_deliveries clears the log")
    finally:
        ra.stop()
        rb.stop()


def test_retention(fk):
    events = fk.walk("/v1/events", 100)
    oldest, newest = fk.api("/v1/events/" + events[-1])[2], fk.api("/v1/events/" + events[0])[2]
    assert oldest["created"] < newest["created"]
    expired = fk.admin("POST", "expire_events", {"before": newest["created"]})["expired"]
    check(expired >= 1, "expire_events purges %d events" % expired)
    for param in ("starting_after", "ending_before"):
        status, _, err = fk.api("/v1/events?%s=%s" % (param, oldest["id"]))
        check(status == 400 and err["error"]["code"] == "resource_missing"
              and err["error"]["message"] == "No such event: '%s'" % oldest["id"] and err["error"]["param"] == param,
              "%s on an expired event -> 400 No such event" % param)
    check(fk.api("/v1/events/" + oldest["id"])[0] == 404, "expired event retrieve -> 404")
    check(fk.api("/v1/events?ending_before=" + newest["id"])[0] == 200, "retained cursor still works")
    fk.admin("POST", "clock", {"advance": 31 * 86400})
    status, h, page = fk.api("/v1/events?limit=5")
    check(page["data"] == [] and fk.api("/v1/events?ending_before=" + newest["id"])[0] == 400,
          "31 days later every event is gone")
    check(time.time() + 30 * 86400 < time.mktime(time.strptime(h["Date"], "%a, %d %b %Y %H:%M:%S GMT")) - time.timezone,
          "Date header follows the server clock")
    fk.admin("POST", "clock", {"offset": 0})


def test_faults(fk):
    fk.admin("POST", "faults", {"path_regex": r"^/v1/customers\?", "status": 500, "count": 2})
    results = [fk.api("/v1/customers?limit=1") for _ in range(3)]
    check([r[0] for r in results] == [500, 500, 200] and results[0][2]["error"]["type"] == "api_error"
          and results[0][1]["Request-Id"].startswith("req_"), "500 fault twice (api_error body), then normal")
    fk.admin("POST", "faults", {"path_regex": "/v1/charges", "drop": True})
    try:
        fk.api("/v1/charges")
        dropped = False
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError):
        dropped = True
    check(dropped, "drop fault closes the connection")
    fk.admin("POST", "faults", {"path_regex": "/v1/products", "delay": 0.5})
    t0 = time.time()
    check(fk.api("/v1/products")[0] == 200 and time.time() - t0 >= 0.5, "delay fault")
    fk.admin("POST", "faults", {"path_regex": "/v1/prices", "status": 200, "truncate": True, "body": {"x": "y" * 50}})
    try:
        fk.api("/v1/prices")
        broken = False
    except (http.client.HTTPException, ConnectionError, urllib.error.URLError):
        broken = True
    check(broken, "truncate fault breaks the transfer")
    log = fk.admin("GET", "requests")
    check(log and {"t", "method", "path", "query", "status"} <= set(log[-1]), "request log")
    fk.admin("DELETE", "faults")


def test_speed(fk):
    conn = http.client.HTTPConnection("127.0.0.1", fk.port, timeout=30)
    t0, cursor = time.time(), None
    for _ in range(5):
        conn.request("GET", "/v1/customers?limit=100" + ("&starting_after=" + cursor if cursor else ""),
                     headers={"Authorization": "Bearer " + KEY})
        resp = conn.getresponse()
        page = json.loads(resp.read())
        assert resp.status == 200 and len(page["data"]) == 100, page
        cursor = page["data"][-1]["id"]
    per_page = (time.time() - t0) / 5
    check(per_page < 0.2, "5 pages of 100 on one keep-alive connection, %.1f ms/page" % (per_page * 1000))
    conn.close()


def test_rate_limit():
    fk = Fake("--customers", "50", "--subscriptions", "10", "--invoices", "10", "--charges", "10",
              "--payment-intents", "10")
    try:
        check(fk.admin("GET", "rate_limit")["global"] == 25, "default global limit is 25/s (sandbox)")
        results, lock = [], threading.Lock()

        def burst():
            conn = http.client.HTTPConnection("127.0.0.1", fk.port, timeout=30)
            for _ in range(10):
                conn.request("GET", "/v1/customers?limit=1", headers={"Authorization": "Bearer " + KEY})
                resp = conn.getresponse()
                body = json.loads(resp.read())
                with lock:
                    results.append((resp.status, dict(resp.headers), body))
            conn.close()

        threads = [threading.Thread(target=burst) for _ in range(6)]
        t0 = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.time() - t0
        limited = [r for r in results if r[0] == 429]
        ok = [r for r in results if r[0] == 200]
        # A sliding one-second window admits at most 25 per second of burst.
        check(limited and len(ok) <= 25 * (1 + int(elapsed)),
              "60 requests in %.2f s: %d answered, %d got 429" % (elapsed, len(ok), len(limited)))
        status, h, body = limited[0]
        check(body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == "rate_limit"
              and "rate limit" in body["error"]["message"] and h.get("Stripe-Rate-Limited-Reason") == "global-rate"
              and "Retry-After" not in h and h["Request-Id"].startswith("req_"),
              "429 body code rate_limit, Stripe-Rate-Limited-Reason: global-rate, no Retry-After")
        time.sleep(1.1)
        check(fk.api("/v1/customers?limit=1")[0] == 200, "a second later requests pass again")
        fk.admin("POST", "rate_limit", {"global": 0, "endpoint": 3})
        codes = [fk.api("/v1/customers?limit=1")[0] for _ in range(4)]
        status, h, _ = fk.api("/v1/customers?limit=1")
        check(codes[:3] == [200, 200, 200] and status == 429 and h["Stripe-Rate-Limited-Reason"] == "endpoint-rate"
              and fk.api("/v1/charges?limit=1")[0] == 200, "per-endpoint limit: other endpoints unaffected")
    finally:
        fk.stop()


def main():
    fk = Fake("--seed", "3", "--rate-limit", "0", "--endpoint-rate-limit", "0")
    try:
        test_auth(fk)
        test_params(fk)
        test_pagination(fk)
        test_objects(fk)
        test_events(fk)
        test_webhooks(fk)
        test_retention(fk)
        test_faults(fk)
        test_fault_kinds(fk, "/v1/customers?limit=20", {"Authorization": "Bearer " + KEY},
                         r"^/v1/customers\?limit=20", lambda d: d["data"], {"id", "object"}, "stripe",
                         "/v1/customers?limit=20&created[gt]=4000000000")
        test_speed(fk)
    finally:
        fk.stop()
    test_rate_limit()
    print("all fake_stripe self-tests passed")


if __name__ == "__main__":
    main()
