#!/usr/bin/python3
"""Fake Stripe API (read side) for the `sync` test suite (Python 3.11, stdlib only).

Run:  /usr/bin/python3 test/fake_stripe.py --port 0 [--seed 1] [--customers 500]
      [--products 20] [--prices 40] [--subscriptions 200] [--invoices 300]
      [--payment-intents 300] [--charges 300] [--deleted-customers 5]
      [--base-time ISO|now] [--api-key sk_test_...] [--api-version 2024-06-20]
      [--rate-limit 25] [--endpoint-rate-limit 25] [--concurrency-limit 0] [--verbose]
Prints "listening on PORT" once ready (stdout, flushed). Binds 127.0.0.1 only.

Imitates one Stripe account in test mode, read-only over /v1 (writes go through
/__admin/, which also emits the events Stripe would):
  * Auth: "Authorization: Bearer <key>" or HTTP Basic with the key as user name.
    Missing/unknown keys get Stripe's 401 bodies (key masked like Stripe: first 8
    characters, stars, last 4 -- last 6 for rk_ keys); expired keys get 401
    api_key_expired; restricted keys (rk_test_...) lacking a permission get 403.
  * Lists: GET /v1/{customers,charges,invoices,subscriptions,products,prices,
    payment_intents,events} with limit (1..100, default 10), starting_after,
    ending_before, created / created[gt|gte|lt|lte], expand[] and per-list filters.
    Unknown parameters are rejected like Stripe does ("Received unknown parameter").
    Order is newest first: created descending, ties by id descending. Events are the
    exception: their ids are random, so same-second events are ordered by the order
    they were emitted (an internal sequence number); the list order is the truth.
  * Retrieve: GET /v1/{kind}/{id}; a deleted customer answers
    {"id", "object": "customer", "deleted": true}; other deleted objects 404.
    GET /v1/invoices/{id}/lines pages an invoice's full line list (the invoice
    object itself carries at most 10 lines with has_more).
  * Subscriptions: the list hides canceled ones unless status=all|canceled|ended.
  * Events: every admin create/update/delete emits the events Stripe would
    (customer.created/updated/deleted, invoice.finalized/paid/..., charge.succeeded,
    customer.subscription.* ...) with data.object = the object at that moment and
    data.previous_attributes on updates. Events older than 30 days (by the server
    clock) are purged for good: a cursor naming one answers 400 resource_missing.
  * Rate limits (docs.stripe.com/rate-limits): a global limit (sandbox default 25
    requests/s) and a per-endpoint limit (default 25/s) over a sliding one-second
    window, plus an optional concurrency limit. Over the limit: 429 with code
    rate_limit and a Stripe-Rate-Limited-Reason header (global-rate,
    endpoint-rate, global-concurrency); no Retry-After (the docs name none).
  * Every /v1 response carries Request-Id and Stripe-Version; the Date header
    follows the server clock (shiftable or freezable via /__admin/clock).
  * Webhooks: endpoints (POST /__admin/webhook_endpoints, or the real /v1/webhook_endpoints,
    the only /v1 writes) get every event as Stripe POSTs it, signed with Stripe-Signature,
    from a background thread (never delaying the write), retried after 0.2/0.5/1 s on a
    non-2xx or a failed connection (Stripe itself retries for up to 3 days). Deliveries can be
    held (dropped), are logged (GET /__admin/webhook_deliveries) and can be crafted
    (POST /__admin/webhooks/send) for signature tests.

Seeded data is deterministic per --seed. Seeded objects have no events (as if
created before the 30-day event horizon); their created times end one hour before
--base-time (default 2025-03-01T00:00:00Z). The oldest customers come in a burst of
150 sharing one `created` second, and with >= 400 customers a second burst of 120
sits in the middle: both are larger than a 100-object page (--deleted-customers are
picked at random, so a burst can list a few fewer).

/__admin/ is the test-control API (JSON in/out, no auth, not rate limited, not
logged); GET /__admin/ lists every endpoint with its shape (ADMIN_HELP below).
"""

import argparse
import base64
import bisect
import copy
import email.utils
import fnmatch
import hashlib
import hmac
import json
import random
import re
import secrets
import socket
import sys
import threading
import time
import traceback
from collections import deque
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

from fakelib import (FAULT_HELP, WEBHOOK_ADMIN_HELP, FaultDelivery, WebhookSender, fault_on_real_answer,
                     fault_pick, make_fault, webhook_admin)

UTC = timezone.utc
DEFAULT_API_VERSION = "2024-06-20"
DEFAULT_KEY = "sk_test_51SyncFakeStripeKey0000000000000000000000abcd"
ACCOUNT_ID = "acct_1SyncFakeAcct0001"
EVENT_RETENTION = 30 * 86400          # events are listable for 30 days
DEFAULT_LIMIT, MAX_LIMIT = 10, 100
NESTED_LIST_LIMIT = 10                # invoice.lines / subscription.items carry at most 10
MAX_EXPAND_DEPTH = 4
MAX_TYPES = 20
MAX_WEBHOOK_ENDPOINTS = 16            # Stripe's limit per account (and mode)
WEBHOOK_USER_AGENT = "Stripe/1.0 (+https://stripe.com/docs/webhooks)"
WEBHOOK_CONTENT_TYPE = "application/json; charset=utf-8"
# Test-mode deliveries also carry a v0 scheme, signed with a key that is not the endpoint's
# secret: receivers must verify v1 only (docs.stripe.com/webhooks: ignore schemes other than v1).
WEBHOOK_V0_KEY = b"whsec_test_mode_v0_scheme_is_not_your_secret"
EVENT_TYPE_RE = re.compile(r"^[a-z_]+(\.[a-z_]+)+$")
JSON_TYPE = "application/json"
SUBSCRIPTION_STATUSES = ["active", "past_due", "unpaid", "canceled", "incomplete",
                         "incomplete_expired", "trialing", "paused"]

ADMIN_HELP = {
    "POST /__admin/objects/{kind}[?automatic=1]":
        "body {field: value, ...} -> 201 object. kind: customers, charges, invoices, subscriptions, "
        "products, prices, payment_intents. Unset fields get realistic defaults; links (customer, "
        "product, ...) default to a random live object. Extra keys: subscriptions {price: id | "
        "prices: [id]}, invoices {line_count: N}. created defaults to now. Emits the creation "
        "events; automatic=1 makes event.request.id null (as if Stripe did it)",
    "GET /__admin/objects/{kind}[?include_deleted=1]": "-> [object, ...] newest first (deleted excluded)",
    "GET /__admin/objects/{kind}/{id}": "-> object (deleted ones too, with _deleted: true)",
    "PATCH /__admin/objects/{kind}/{id}[?automatic=1]":
        "body {field: value} -> object; metadata merges (null or '' removes a key); status changes "
        "fill their timestamps and emit their events (invoice.paid, customer.subscription.deleted...)",
    "DELETE /__admin/objects/{kind}/{id}":
        "customers (cancels their subscriptions first), products (without live prices), prices, "
        "draft invoices -> {id, object, deleted: true}; subscriptions -> canceled subscription",
    "POST /__admin/bulk/{kind}": "body {count, fields?, created?} -> {ids, created}: count objects "
                                 "sharing ONE created second (default now), each with its events",
    "GET /__admin/events[?type=glob]": "-> [event, ...] newest first (retained ones)",
    "POST /__admin/events": "body {type, object, previous_attributes?, created?, automatic?} -> 201 event "
                            "(inject any event, e.g. one for a virtual object)",
    "POST /__admin/expire_events": "body {before: unix_ts} -> {expired: N} (purged for good)",
    "POST /__admin/clock": "body {offset: s} | {now: unix_ts|ISO} | {advance: s}, and/or {freeze: bool} "
                           "-> {now, now_iso, offset, frozen}; events past 30 days are then purged",
    "GET /__admin/keys": "-> [{key, restricted, permissions, state}]",
    "POST /__admin/keys": "body {key?, restricted?: bool, permissions?: [kind|'events', ...]} -> 201 key",
    "POST /__admin/keys/{key}/expire": "-> key (then 401 api_key_expired)",
    "DELETE /__admin/keys/{key}": "-> {revoked: key} (then 401 Invalid API Key)",
    "GET /__admin/rate_limit": "-> {global, endpoint, concurrency, limited}",
    "POST /__admin/rate_limit": "body {global?, endpoint?, concurrency?} (requests/s; 0 = off) -> same",
    "POST /__admin/faults": FAULT_HELP,
    "GET /__admin/faults": "-> [fault, ...]",
    "DELETE /__admin/faults": "-> {cleared: N}",
    "GET /__admin/requests": "-> [{t, method, path, query, status, request_id}]",
    "DELETE /__admin/requests": "-> {cleared: N}",
    "GET /__admin/stats": "-> {requests: {endpoint: n}, total_requests, rate_limited, objects, events}",
    "POST /__admin/reset": "body {seed?, customers?, products?, ...} -> {objects: {kind: n}} (also removes "
                           "the webhook endpoints, releases a hold and clears the delivery log)",
    "POST /__admin/webhook_endpoints":
        "body {url, secret?, enabled_events?: ['*'] | [type, ...], disabled?: bool, description?} -> 201 "
        "{id: 'we_...', object: 'webhook_endpoint', url, secret: 'whsec_...', enabled_events, status, ...}. "
        "The public API has the same: POST /v1/webhook_endpoints (form: url, enabled_events[], description; "
        "secret only in that answer), GET /v1/webhook_endpoints[/{id}], POST /v1/webhook_endpoints/{id} "
        "(url, enabled_events[], disabled, description), DELETE /v1/webhook_endpoints/{id}. At most 16",
    "GET /__admin/webhook_endpoints": "-> [endpoint with secret, ...] oldest first",
    "DELETE /__admin/webhook_endpoints/{id}": "-> {id, object, deleted: true} (its queued deliveries are "
                                             "cancelled)",
    "(deliveries)":
        "every event emitted (admin writes, POST /__admin/events) is POSTed to each enabled endpoint whose "
        "enabled_events has '*' or its type: body = the event exactly as GET /v1/events/{id} returns it "
        "(pending_webhooks = endpoints still to acknowledge: set at emission, decremented per 2xx); headers "
        "Content-Type: application/json; charset=utf-8, User-Agent: Stripe/1.0 (+https://stripe.com/docs/"
        "webhooks), Cache-Control: no-cache, Accept: */*; q=0.5, application/xml, Stripe-Signature: "
        "t=<unix wall-clock seconds of the attempt>,v1=<hex HMAC-SHA256(key = the whsec_ secret's UTF-8 "
        "bytes, msg = '<t>.' + body)>,v0=<hex HMAC with another key (test mode): ignore it>. t is the real "
        "clock, not /__admin/clock, so a receiver's 300 s tolerance holds while a test moves the fake's "
        "clock. Log ids: event_id, endpoint_id, type. Retries: see /__admin/webhooks/config (Stripe itself "
        "retries for up to 3 days)",
    "POST /__admin/webhooks/send":
        "body {url?, endpoint_id?, event_id?, event?: {...}, body?: raw string, timestamp?: unix s, "
        "secret?, signature?: whole Stripe-Signature value} -> {status, response_body, headers, body}: one "
        "crafted delivery, sent synchronously, not retried, logged with crafted: true. url/secret default "
        "to endpoint_id's (else the first enabled endpoint's); the body to `body`, else `event` encoded, "
        "else event event_id, else the newest event; timestamp to now; the signature is computed from "
        "those unless given (so a stale timestamp, a wrong secret or a tampered body can be sent)",
}
ADMIN_HELP.update(WEBHOOK_ADMIN_HELP)


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------

class StripeError(Exception):
    """An API error: HTTP status plus Stripe's {"error": {...}} envelope."""

    def __init__(self, status, message, type_="invalid_request_error", code=None, param=None,
                 headers=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self, request_id, now):
        # Stripe sends the error fields in alphabetical order and omits empty ones.
        err = {}
        if self.code:
            err["code"] = self.code
            err["doc_url"] = "https://stripe.com/docs/error-codes/" + self.code.replace("_", "-")
        err["message"] = self.message
        if self.param:
            err["param"] = self.param
        if request_id:
            err["request_log_url"] = "https://dashboard.stripe.com/test/logs/%s?t=%d" % (request_id, now)
        err["type"] = self.type
        return {"error": err}


class AdminError(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def invalid(message, param=None, code=None, status=400):
    return StripeError(status, message, code=code, param=param)


def no_such(noun, obj_id, param, status):
    return StripeError(status, "No such %s: '%s'" % (noun, obj_id), code="resource_missing", param=param)


def unknown_parameter(name):
    return invalid("Received unknown parameter: %s" % name, param=name)


def unrecognized_url(method, path):
    return StripeError(404, "Unrecognized request URL (%s: %s). Please see https://stripe.com/docs or we "
                            "can help at https://support.stripe.com/." % (method, path))


NO_KEY_MESSAGE = ("You did not provide an API key. You need to provide your API key in the Authorization "
                  "header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY'). See "
                  "https://stripe.com/docs/api#authentication for details, or we can help at "
                  "https://support.stripe.com/.")
RATE_LIMIT_MESSAGE = ("Testmode request rate limit exceeded, the rate limits in testmode are lower than "
                      "livemode. You can learn more about rate limits here https://stripe.com/docs/rate-limits.")


def mask_key(key):
    """Stripe shows the first 8 characters, stars, then the last 4 (6 for restricted keys)."""
    tail = 6 if key.startswith("rk_") else 4
    if len(key) <= 8 + tail:
        return "*" * len(key)
    return key[:8] + "*" * (len(key) - 8 - tail) + key[-tail:]


def default_error(status):
    """What Stripe sends for a status when a fault gives no body."""
    if status == 401:
        return StripeError(401, NO_KEY_MESSAGE)
    if status == 403:
        return StripeError(403, "The provided key does not have the required permissions for this endpoint.")
    if status == 404:
        return StripeError(404, "Unrecognized request URL. Please see https://stripe.com/docs or we can help "
                                "at https://support.stripe.com/.")
    if status == 429:
        return StripeError(429, RATE_LIMIT_MESSAGE, code="rate_limit",
                           headers={"Stripe-Rate-Limited-Reason": "global-rate"})
    if status >= 500:
        return StripeError(status, "An unknown error occurred", type_="api_error")
    return StripeError(status, "Invalid request")


# ----------------------------------------------------------------------------
# Ids
# ----------------------------------------------------------------------------

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


class IdMaker:
    """Unique random ids like Stripe's: prefix + base62. Random on purpose: Stripe ids carry no order."""

    def __init__(self, rng):
        self.rng = rng
        self.used = set()

    def new(self, prefix, length):
        while True:
            ident = prefix + "".join(self.rng.choice(BASE62) for _ in range(length))
            if ident not in self.used:
                self.used.add(ident)
                return ident


# ----------------------------------------------------------------------------
# Object kinds
# ----------------------------------------------------------------------------

class Kind:
    def __init__(self, name, obj, prefix, id_len, noun, event_prefix, permission):
        self.name = name                  # list path under /v1, and admin name
        self.obj = obj                    # the "object" field
        self.prefix = prefix
        self.id_len = id_len
        self.noun = noun                  # in "No such <noun>: 'id'"
        self.event_prefix = event_prefix  # events are <prefix>.created, ...
        self.permission = permission      # restricted-key permission named in 403s


KINDS = {k.name: k for k in [
    Kind("customers", "customer", "cus_", 14, "customer", "customer", "rak_customer_read"),
    Kind("charges", "charge", "ch_", 24, "charge", "charge", "rak_charge_read"),
    Kind("invoices", "invoice", "in_", 24, "invoice", "invoice", "rak_invoice_read"),
    Kind("subscriptions", "subscription", "sub_", 24, "subscription", "customer.subscription",
         "rak_subscription_read"),
    Kind("products", "product", "prod_", 14, "product", "product", "rak_product_read"),
    Kind("prices", "price", "price_", 24, "price", "price", "rak_price_read"),
    Kind("payment_intents", "payment_intent", "pi_", 24, "payment_intent", "payment_intent",
         "rak_payment_intent_read"),
]}
KIND_BY_OBJECT = {k.obj: k for k in KINDS.values()}
EVENTS_PERMISSION = "rak_event_read"

# (object, field) -> kind of the object an id in that field expands to
EXPANDABLE = {
    ("charge", "customer"): "customers", ("charge", "invoice"): "invoices",
    ("charge", "payment_intent"): "payment_intents",
    ("invoice", "customer"): "customers", ("invoice", "subscription"): "subscriptions",
    ("invoice", "payment_intent"): "payment_intents", ("invoice", "charge"): "charges",
    ("subscription", "customer"): "customers", ("subscription", "latest_invoice"): "invoices",
    ("payment_intent", "customer"): "customers", ("payment_intent", "latest_charge"): "charges",
    ("payment_intent", "invoice"): "invoices",
    ("price", "product"): "products", ("product", "default_price"): "prices",
}

# Fields an admin PATCH may not touch (ids, creation facts, nested lists Stripe manages).
IMMUTABLE = {"id", "object", "created", "livemode", "items", "lines", "client_secret"}


# ----------------------------------------------------------------------------
# Seed vocabulary and object builders
# ----------------------------------------------------------------------------

FIRST_NAMES = ["James", "Mary", "José", "Zoë", "Łukasz", "Søren", "Aoife", "Nguyễn", "Ana María", "Björn",
               "François", "Chloé", "Jürgen", "Siobhán", "Priya", "Wei", "Yuki", "Olga", "D'Arcy", "花子"]
LAST_NAMES = ["Smith", "O'Brien", "Müller", "García", "Åkesson", "Kowalski", "Nakamura", "渡辺", "Ivanov",
              "Nuñez", "Østergaard", "MacDonald", "Smith-Jones", "Lee", "Schröder", "Johnson", "Brown"]
CITIES = [("San Francisco", "CA", "94105", "US", "1 Market St"),
          ("New York", "NY", "10001", "US", "350 Fifth Avenue"),
          ("München", "Bayern", "80331", "DE", "Marienplatz 8"),
          ("Kraków", None, "30-001", "PL", "ul. Floriańska 12"),
          ("São Paulo", "SP", "01000-000", "BR", "Av. Paulista, 1000"),
          ("Montréal", "QC", "H2Y 1C6", "CA", "1000 Rue Saint-Antoine O"),
          ("Tokyo", None, "100-0001", "JP", "1-1 Marunouchi"),
          ("Dublin", None, "D02 X285", "IE", "12 O'Connell St")]
PRODUCT_NAMES = ["Starter plan", "Pro plan", "Enterprise plan", "Extra seat", "Support add-on", "API calls",
                 "Storage (GB)", "Onboarding", "Training day", "Consulting hour", "Hosting", "Backup add-on",
                 "SSO add-on", "Audit log", "Premium support", "Data export", "Analytics", "Priority queue",
                 "White label", "Custom domain"]
DESCRIPTIONS = [None, None, "VIP; call first", "Said \"invoice me\"", "Line one\nLine two", "Emoji 🎉 party",
                "50% off; 'quoted' value", "Backslash \\ path C:\\temp"]
CARD_BRANDS = ["visa", "mastercard", "amex", "discover"]


def maybe(rng, p, value):
    """value with probability p, else None (seeded data has realistic nulls)."""
    return value if rng.random() < p else None


def timestamp_schedule(rng, count, end, first_batch, big_batch):
    """`created` seconds for `count` objects in creation order, all before `end`.

    Objects come in bursts sharing ONE second (as a bulk import would make them): the
    first `first_batch` share a second, and when `big_batch` is set a burst of that
    size sits in the middle. Gaps between bursts are up to 15 minutes."""
    sizes, remaining = [], count
    if first_batch and remaining >= first_batch:
        sizes.append(first_batch)
        remaining -= first_batch
    big_at = count // 2 if big_batch and count - first_batch >= big_batch + 50 else None
    placed = sum(sizes)
    while remaining > 0:
        if big_at is not None and placed >= big_at:
            size, big_at = big_batch, None
        else:
            size = rng.choice([1, 1, 1, 1, 1, 2, 2, 3, 5])
        size = min(size, remaining)
        sizes.append(size)
        remaining -= size
        placed += size
    gaps = [rng.randint(1, 900) for _ in sizes]
    t = end - sum(gaps)
    out = []
    for size, gap in zip(sizes, gaps):
        t += gap
        out.extend([t] * size)
    return out


def list_object(data, url, limit=NESTED_LIST_LIMIT):
    """A nested list as Stripe embeds it: at most `limit` entries, has_more, total_count, url."""
    return {"object": "list", "data": data[:limit], "has_more": len(data) > limit,
            "total_count": len(data), "url": url}


class Builder:
    """Makes realistic objects. `pick(kind)` returns a random live object id to link to (or None)."""

    def __init__(self, rng, ids, pick, lookup, horizon):
        self.rng = rng
        self.ids = ids
        self.pick = pick
        self.lookup = lookup
        self.horizon = horizon      # latest time a past fact (like ended_at) may have

    def metadata(self):
        rng = self.rng
        md = {}
        if rng.random() < 0.4:
            md["plan_tier"] = rng.choice(["gold", "silver", "bronze"])
        if rng.random() < 0.2:
            md["crm_id"] = "CRM-%05d" % rng.randint(1, 99999)
        return md

    def address(self):
        city, state, postal, country, line1 = self.rng.choice(CITIES)
        return {"city": city, "country": country, "line1": line1,
                "line2": maybe(self.rng, 0.2, "Suite %d" % self.rng.randint(1, 900)),
                "postal_code": postal, "state": state}

    def customer(self, created):
        rng = self.rng
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        name = "%s %s" % (first, last)
        return {
            "id": self.ids.new("cus_", 14), "object": "customer",
            "address": maybe(rng, 0.7, self.address()),
            "balance": rng.choice([0, 0, 0, 0, -500, 1200]),
            "created": created,
            "currency": maybe(rng, 0.8, "usd"),
            "default_source": None,
            "delinquent": rng.random() < 0.05,
            "description": rng.choice(DESCRIPTIONS),
            "discount": None,
            "email": "%s.%d@example.com" % (re.sub(r"[^a-z]", "", last.lower()) or "user", rng.randint(1, 99999)),
            "invoice_prefix": "".join(rng.choice("0123456789ABCDEF") for _ in range(8)),
            "invoice_settings": {"custom_fields": None, "default_payment_method": None, "footer": None,
                                 "rendering_options": None},
            "livemode": False,
            "metadata": self.metadata(),
            "name": name,
            "next_invoice_sequence": rng.randint(1, 12),
            "phone": maybe(rng, 0.5, "+1 555 %03d %04d" % (rng.randint(0, 999), rng.randint(0, 9999))),
            "preferred_locales": rng.choice([[], [], ["en"], ["de", "en"]]),
            "shipping": None,
            "tax_exempt": rng.choice(["none", "none", "none", "exempt"]),
            "test_clock": None,
        }

    def product(self, created):
        rng = self.rng
        return {
            "id": self.ids.new("prod_", 14), "object": "product",
            "active": rng.random() < 0.9,
            "attributes": [],
            "created": created,
            "default_price": None,
            "description": maybe(rng, 0.6, "Includes %d seats" % rng.randint(1, 50)),
            "images": [],
            "livemode": False,
            "marketing_features": [],
            "metadata": self.metadata(),
            "name": rng.choice(PRODUCT_NAMES),
            "package_dimensions": None,
            "shippable": None,
            "statement_descriptor": None,
            "tax_code": None,
            "type": "service",
            "unit_label": maybe(rng, 0.2, "seat"),
            "updated": created,
            "url": None,
        }

    def price(self, created, product=None):
        rng = self.rng
        recurring = rng.random() < 0.75
        amount = rng.choice([500, 900, 1500, 2000, 4900, 9900, 19900])
        return {
            "id": self.ids.new("price_", 24), "object": "price",
            "active": rng.random() < 0.9,
            "billing_scheme": "per_unit",
            "created": created,
            "currency": "usd",
            "custom_unit_amount": None,
            "livemode": False,
            "lookup_key": None,
            "metadata": {},
            "nickname": maybe(rng, 0.3, rng.choice(["Monthly", "Yearly", "Legacy"])),
            "product": product or self.pick("products"),
            "recurring": {"aggregate_usage": None, "interval": rng.choice(["month", "month", "year"]),
                          "interval_count": 1, "meter": None, "trial_period_days": None,
                          "usage_type": "licensed"} if recurring else None,
            "tax_behavior": "unspecified",
            "tiers_mode": None,
            "transform_quantity": None,
            "type": "recurring" if recurring else "one_time",
            "unit_amount": amount,
            "unit_amount_decimal": str(amount),
        }

    def subscription_item(self, sub_id, price, created):
        return {"id": self.ids.new("si_", 14), "object": "subscription_item", "billing_thresholds": None,
                "created": created, "discounts": [], "metadata": {}, "plan": None, "price": price,
                "quantity": self.rng.choice([1, 1, 1, 2, 5]), "subscription": sub_id, "tax_rates": []}

    def subscription(self, created, customer=None, price_ids=None, status=None):
        rng = self.rng
        sub_id = self.ids.new("sub_", 24)
        if price_ids is None:
            price_ids = [p for p in (self.pick("prices", recurring=True),) if p]
        prices = [self.lookup("prices", p) for p in price_ids]
        items = [self.subscription_item(sub_id, p, created) for p in prices if p]
        status = status or rng.choice(["active"] * 8 + ["trialing", "past_due", "canceled", "canceled",
                                                         "unpaid", "incomplete", "incomplete_expired",
                                                         "paused"])
        yearly = bool(prices) and prices[0] is not None and (prices[0]["recurring"] or {}).get("interval") == "year"
        interval = (365 if yearly else 30) * 86400
        ended = min(created + rng.randint(60, 40 * 86400), max(created, self.horizon)) \
            if status in ("canceled", "incomplete_expired") else None
        sub = {
            "id": sub_id, "object": "subscription",
            "application": None, "application_fee_percent": None,
            "automatic_tax": {"enabled": False, "liability": None},
            "billing_cycle_anchor": created,
            "billing_thresholds": None,
            "cancel_at": None,
            "cancel_at_period_end": status == "active" and rng.random() < 0.1,
            "canceled_at": ended if status == "canceled" else None,
            "cancellation_details": {"comment": None, "feedback": None,
                                     "reason": "cancellation_requested" if status == "canceled" else None},
            "collection_method": rng.choice(["charge_automatically"] * 4 + ["send_invoice"]),
            "created": created,
            "currency": "usd",
            "current_period_end": created + interval,
            "current_period_start": created,
            "customer": customer or self.pick("customers"),
            "days_until_due": None,
            "default_payment_method": None,
            "default_source": None,
            "default_tax_rates": [],
            "description": None,
            "discount": None,
            "discounts": [],
            "ended_at": ended,
            "items": list_object(items, "/v1/subscription_items?subscription=" + sub_id),
            "latest_invoice": None,
            "livemode": False,
            "metadata": self.metadata(),
            "next_pending_invoice_item_invoice": None,
            "on_behalf_of": None,
            "pause_collection": None,
            "payment_settings": {"payment_method_options": None, "payment_method_types": None,
                                 "save_default_payment_method": "off"},
            "pending_invoice_item_interval": None,
            "pending_setup_intent": None,
            "pending_update": None,
            "quantity": items[0]["quantity"] if len(items) == 1 else None,
            "schedule": None,
            "start_date": created,
            "status": status,
            "test_clock": None,
            "transfer_data": None,
            "trial_end": created + 14 * 86400 if status == "trialing" else None,
            "trial_settings": {"end_behavior": {"missing_payment_method": "create_invoice"}},
            "trial_start": created if status == "trialing" else None,
        }
        return sub

    def invoice_line(self, inv_id, sub, created):
        rng = self.rng
        price = self.lookup("prices", self.pick("prices")) if sub is None else (
            sub["items"]["data"][0]["price"] if sub["items"]["data"] else None)
        qty = rng.choice([1, 1, 2, 3])
        amount = (price["unit_amount"] if price else 1000) * qty
        return {"id": self.ids.new("il_", 24), "object": "line_item", "amount": amount,
                "amount_excluding_tax": amount, "currency": "usd",
                "description": "%d × %s" % (qty, "Seat" if price is None else price.get("nickname") or "Item"),
                "discount_amounts": [], "discountable": True, "discounts": [], "invoice": inv_id,
                "livemode": False, "metadata": {}, "period": {"end": created + 30 * 86400, "start": created},
                "plan": None, "price": price, "proration": False, "proration_details": {"credited_items": None},
                "quantity": qty, "subscription": sub["id"] if sub else None,
                "subscription_item": sub["items"]["data"][0]["id"] if sub and sub["items"]["data"] else None,
                "tax_amounts": [], "tax_rates": [], "type": "subscription" if sub else "invoiceitem",
                "unit_amount_excluding_tax": str(amount // qty)}

    def invoice(self, created, customer=None, subscription=None, status=None, line_count=None):
        """Returns (invoice, full line list)."""
        rng = self.rng
        inv_id = self.ids.new("in_", 24)
        sub = self.lookup("subscriptions", subscription) if subscription else None
        cust = self.lookup("customers", customer or (sub["customer"] if sub else self.pick("customers")))
        if line_count is None:
            line_count = rng.choice([1, 1, 1, 2, 3]) if rng.random() > 0.06 else rng.randint(12, 25)
        lines = [self.invoice_line(inv_id, sub, created) for _ in range(line_count)]
        total = sum(line["amount"] for line in lines)
        status = status or rng.choice(["paid"] * 6 + ["open", "open", "draft", "void", "uncollectible"])
        inv = {
            "id": inv_id, "object": "invoice",
            "account_country": "US", "account_name": "Sync Fake Co.",
            "amount_due": total, "amount_paid": 0, "amount_remaining": total, "amount_shipping": 0,
            "attempt_count": 0, "attempted": False, "auto_advance": status == "draft",
            "billing_reason": ("subscription_create" if rng.random() < 0.3 else "subscription_cycle") if sub
            else "manual",
            "charge": None,
            "collection_method": sub["collection_method"] if sub else "charge_automatically",
            "created": created, "currency": "usd",
            "customer": cust["id"] if cust else None,
            "customer_email": cust.get("email") if cust else None,
            "customer_name": cust.get("name") if cust else None,
            "description": None, "discount": None, "discounts": [],
            "due_date": None,
            "ending_balance": None,
            "hosted_invoice_url": None, "invoice_pdf": None,
            "lines": list_object(lines, "/v1/invoices/%s/lines" % inv_id),
            "livemode": False,
            "metadata": {},
            "number": None,
            "paid": False, "paid_out_of_band": False,
            "payment_intent": None,
            "period_end": created, "period_start": created - 30 * 86400 if sub else created,
            "status": "draft",
            "status_transitions": {"finalized_at": None, "marked_uncollectible_at": None, "paid_at": None,
                                   "voided_at": None},
            "subscription": sub["id"] if sub else None,
            "subtotal": total, "total": total,
            "webhooks_delivered_at": created,
        }
        return apply_invoice_status(inv, status, created, cust), lines

    def payment_intent(self, created, customer=None, status=None, amount=None, invoice=None):
        rng = self.rng
        pi_id = self.ids.new("pi_", 24)
        status = status or rng.choice(["succeeded"] * 6 + ["requires_payment_method", "requires_action",
                                                           "processing", "canceled", "requires_capture"])
        amount = amount or rng.choice([500, 1500, 2000, 4900, 9900, 25000])
        pi = {
            "id": pi_id, "object": "payment_intent",
            "amount": amount, "amount_capturable": 0, "amount_details": {"tip": {}}, "amount_received": 0,
            "application": None, "application_fee_amount": None,
            "automatic_payment_methods": {"allow_redirects": "always", "enabled": True},
            "canceled_at": None, "cancellation_reason": None,
            "capture_method": "automatic",
            "client_secret": "%s_secret_%s" % (pi_id, "".join(rng.choice(BASE62) for _ in range(25))),
            "confirmation_method": "automatic",
            "created": created, "currency": "usd",
            "customer": customer if customer is not None else maybe(rng, 0.8, self.pick("customers")),
            "description": maybe(rng, 0.3, "Order #%d" % rng.randint(1000, 99999)),
            "invoice": invoice,
            "last_payment_error": None,
            "latest_charge": None,
            "livemode": False,
            "metadata": self.metadata(),
            "next_action": None, "on_behalf_of": None,
            "payment_method": None,
            "payment_method_configuration_details": None,
            "payment_method_options": {"card": {"installments": None, "mandate_options": None, "network": None,
                                                "request_three_d_secure": "automatic"}},
            "payment_method_types": ["card"],
            "processing": None, "receipt_email": None, "review": None, "setup_future_usage": None,
            "shipping": None, "source": None, "statement_descriptor": None,
            "statement_descriptor_suffix": None,
            "status": "requires_payment_method",
            "transfer_data": None, "transfer_group": None,
        }
        return apply_payment_intent_status(pi, status, created, initial=True)

    def charge(self, created, customer=None, status=None, amount=None, payment_intent=None, invoice=None):
        rng = self.rng
        status = status or rng.choice(["succeeded"] * 8 + ["failed", "pending"])
        amount = amount or rng.choice([500, 1500, 2000, 4900, 9900, 25000])
        brand = rng.choice(CARD_BRANDS)
        last4 = "%04d" % rng.randint(0, 9999)
        refunded = status == "succeeded" and rng.random() < 0.05
        ch_id = self.ids.new("ch_", 24)
        cust = customer if customer is not None else maybe(rng, 0.8, self.pick("customers"))
        name = (self.lookup("customers", cust) or {}).get("name") if cust else None
        return {
            "id": ch_id, "object": "charge",
            "amount": amount,
            "amount_captured": amount if status == "succeeded" else 0,
            "amount_refunded": amount if refunded else 0,
            "application": None, "application_fee": None, "application_fee_amount": None,
            "balance_transaction": self.ids.new("txn_", 24) if status == "succeeded" else None,
            "billing_details": {"address": {"city": None, "country": None, "line1": None, "line2": None,
                                            "postal_code": maybe(rng, 0.7, "%05d" % rng.randint(0, 99999)),
                                            "state": None},
                                "email": None, "name": name, "phone": None},
            "calculated_statement_descriptor": "SYNC FAKE CO",
            "captured": status == "succeeded",
            "created": created, "currency": "usd",
            "customer": cust,
            "description": maybe(rng, 0.3, "Order #%d" % rng.randint(1000, 99999)),
            "destination": None, "dispute": None, "disputed": False,
            "failure_balance_transaction": None,
            "failure_code": "card_declined" if status == "failed" else None,
            "failure_message": "Your card was declined." if status == "failed" else None,
            "fraud_details": {},
            "invoice": invoice,
            "livemode": False,
            "metadata": {},
            "on_behalf_of": None,
            "outcome": {"network_status": "declined_by_network" if status == "failed" else "approved_by_network",
                        "reason": "generic_decline" if status == "failed" else None,
                        "risk_level": "normal", "risk_score": rng.randint(0, 99),
                        "seller_message": "The bank did not return any further details with this decline."
                        if status == "failed" else "Payment complete.",
                        "type": "issuer_declined" if status == "failed" else "authorized"},
            "paid": status == "succeeded",
            "payment_intent": payment_intent,
            "payment_method": self.ids.new("pm_", 24),
            "payment_method_details": {"card": {"amount_authorized": amount, "brand": brand,
                                                "checks": {"address_line1_check": None,
                                                           "address_postal_code_check": "pass",
                                                           "cvc_check": "pass"},
                                                "country": "US", "exp_month": rng.randint(1, 12),
                                                "exp_year": rng.randint(2026, 2032),
                                                "fingerprint": "".join(rng.choice(BASE62) for _ in range(16)),
                                                "funding": "credit", "last4": last4, "network": brand,
                                                "three_d_secure": None, "wallet": None},
                                       "type": "card"},
            "receipt_email": None, "receipt_number": None,
            "receipt_url": "https://pay.stripe.com/receipts/payment/%s" % ch_id,
            "refunded": refunded,
            "review": None, "shipping": None, "source_transfer": None,
            "statement_descriptor": None, "statement_descriptor_suffix": None,
            "status": status,
            "transfer_data": None, "transfer_group": None,
        }


def apply_invoice_status(inv, status, at, customer=None):
    """Move an invoice to `status`, filling what Stripe fills on that transition."""
    inv["status"] = status
    tr = inv["status_transitions"]
    if status != "draft":
        tr["finalized_at"] = tr["finalized_at"] or at
        if inv["number"] is None:
            prefix = (customer or {}).get("invoice_prefix") or "FAKE0000"
            inv["number"] = "%s-%04d" % (prefix, int(inv["id"].encode().hex()[:6], 16) % 10000)
        inv["hosted_invoice_url"] = "https://invoice.stripe.com/i/%s/test_%s" % (ACCOUNT_ID, inv["id"][3:])
        inv["invoice_pdf"] = inv["hosted_invoice_url"] + "/pdf"
        inv["auto_advance"] = status == "open"
    if status == "paid":
        inv["paid"] = True
        inv["amount_paid"], inv["amount_remaining"] = inv["amount_due"], 0
        inv["attempted"], inv["attempt_count"] = True, max(1, inv["attempt_count"])
        tr["paid_at"] = tr["paid_at"] or at
    elif status == "void":
        tr["voided_at"] = tr["voided_at"] or at
    elif status == "uncollectible":
        tr["marked_uncollectible_at"] = tr["marked_uncollectible_at"] or at
        inv["attempted"], inv["attempt_count"] = True, max(1, inv["attempt_count"])
    return inv


def apply_payment_intent_status(pi, status, at, initial=False):
    pi["status"] = status
    if status == "succeeded":
        pi["amount_received"] = pi["amount"]
        pi["amount_capturable"] = 0
    elif status == "requires_capture":
        pi["amount_capturable"] = pi["amount"]
    elif status == "canceled":
        pi["canceled_at"] = pi["canceled_at"] or at
        pi["cancellation_reason"] = pi["cancellation_reason"] or "requested_by_customer"
    elif status == "requires_payment_method" and not initial:
        # Back to requires_payment_method after an attempt: the attempt failed.
        pi["last_payment_error"] = pi["last_payment_error"] or {
            "code": "card_declined", "decline_code": "generic_decline", "message": "Your card was declined.",
            "type": "card_error"}
    return pi


def apply_subscription_status(sub, status, at):
    sub["status"] = status
    if status in ("canceled", "incomplete_expired"):
        sub["ended_at"] = sub["ended_at"] or at
    if status == "canceled":
        sub["canceled_at"] = sub["canceled_at"] or at
        sub["cancel_at_period_end"] = False
    if status == "paused":
        sub["pause_collection"] = None
    return sub


# ----------------------------------------------------------------------------
# Storage
# ----------------------------------------------------------------------------

def encode(obj):
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


class Collection:
    """Objects of one kind in list order: `keys` holds (created, id) ascending, so newest-first
    lists walk it backwards. Objects are replaced on write, never mutated in place, so event
    snapshots and cached JSON stay valid."""

    def __init__(self, kind):
        self.kind = kind
        self.objects = {}
        self.keys = []
        self.deleted = set()
        self.sublists = {}      # invoice id -> full line list
        self._json = {}

    def put(self, obj):
        if obj["id"] not in self.objects:
            bisect.insort(self.keys, (obj["created"], obj["id"]))
        self.objects[obj["id"]] = obj
        self._json.pop(obj["id"], None)

    def encoded(self, obj_id):
        """Pre-serialised JSON: a 100-object page is a join of cached bytes."""
        data = self._json.get(obj_id)
        if data is None:
            data = self._json[obj_id] = encode(self.objects[obj_id])
        return data

    def index_of(self, obj_id):
        obj = self.objects.get(obj_id)
        if obj is None:
            return None
        return bisect.bisect_left(self.keys, (obj["created"], obj_id))

    def live(self):
        return [self.objects[k[1]] for k in reversed(self.keys) if k[1] not in self.deleted]


class EventLog:
    """Events ascending by (created, seq, id). seq is the emission order: it orders events that
    share a second, because event ids are random and `created` has one-second resolution."""

    def __init__(self):
        self.keys = []
        self.key_of = {}
        self.events = {}
        self.json = {}
        self.seq = 0

    def add(self, event):
        self.seq += 1
        key = (event["created"], self.seq, event["id"])
        bisect.insort(self.keys, key)
        self.key_of[event["id"]] = key
        self.events[event["id"]] = event
        self.json[event["id"]] = encode(event)

    def index_of(self, evt_id):
        key = self.key_of.get(evt_id)
        return None if key is None else bisect.bisect_left(self.keys, key)

    def purge_before(self, ts):
        """Drop events created before ts for good; returns how many."""
        cut = bisect.bisect_left(self.keys, (ts,))
        for _, _, evt_id in self.keys[:cut]:
            del self.key_of[evt_id]
            del self.events[evt_id]
            del self.json[evt_id]
        del self.keys[:cut]
        return cut


# ----------------------------------------------------------------------------
# Rate limiting
# ----------------------------------------------------------------------------

class RateLimiter:
    """Sliding one-second windows: global and per endpoint, plus concurrent requests in flight.
    Only admitted requests use up the window (a rejected request costs nothing)."""

    def __init__(self, global_rps, endpoint_rps, concurrency):
        self.lock = threading.Lock()
        self.configure(global_rps, endpoint_rps, concurrency)

    def configure(self, global_rps, endpoint_rps, concurrency):
        with self.lock:
            self.global_rps, self.endpoint_rps, self.concurrency = global_rps, endpoint_rps, concurrency
            self.window = deque()
            self.per_endpoint = {}
            self.active = 0
            self.limited = 0

    def admit(self, endpoint):
        """None when admitted (call release() later), else the Stripe-Rate-Limited-Reason."""
        with self.lock:
            now = time.monotonic()
            ep = self.per_endpoint.setdefault(endpoint, deque())
            for win in (self.window, ep):
                while win and win[0] <= now - 1.0:
                    win.popleft()
            reason = None
            if self.concurrency and self.active >= self.concurrency:
                reason = "global-concurrency"
            elif self.global_rps and len(self.window) >= self.global_rps:
                reason = "global-rate"
            elif self.endpoint_rps and len(ep) >= self.endpoint_rps:
                reason = "endpoint-rate"
            if reason:
                self.limited += 1
                return reason
            self.window.append(now)
            ep.append(now)
            self.active += 1
            return None

    def release(self):
        with self.lock:
            self.active -= 1

    def config(self):
        return {"global": self.global_rps, "endpoint": self.endpoint_rps, "concurrency": self.concurrency,
                "limited": self.limited}


# ----------------------------------------------------------------------------
# The account: all mutable state, guarded by one lock
# ----------------------------------------------------------------------------

class Account:
    def __init__(self, cfg):
        self.cfg = cfg
        self.lock = threading.RLock()
        self.request_rng = random.Random(secrets.randbits(64))
        self.limiter = RateLimiter(cfg.rate_limit, cfg.endpoint_rate_limit, cfg.concurrency_limit)
        self.webhooks = WebhookSender("fake_stripe")
        self.reset(cfg.seed, vars(cfg))

    def reset(self, seed, counts):
        with self.lock:
            self.offset, self.frozen_at = 0.0, None
            self.keys = {self.cfg.api_key: {"key": self.cfg.api_key, "restricted": False,
                                            "permissions": None, "state": "active"}}
            self.faults, self.fault_seq = [], 0
            self.request_log, self.endpoint_counts = [], {}
            self.limiter.configure(self.cfg.rate_limit, self.cfg.endpoint_rate_limit,
                                   self.cfg.concurrency_limit)
            self.endpoints = {}         # we_ id -> endpoint (insertion order = creation order)
            self.webhooks.reset()
            self.seed_data(seed, counts)

    # -- clock -----------------------------------------------------------------

    def now(self):
        return self.frozen_at if self.frozen_at is not None else time.time() + self.offset

    def now_int(self):
        return int(self.now())

    def set_clock(self, payload):
        with self.lock:
            frozen = self.frozen_at is not None
            current = self.now()
            if "now" in payload:
                target = parse_when(payload["now"])
                self.offset, current = target - time.time(), target
            if "offset" in payload:
                self.offset = float(payload["offset"])
                current = time.time() + self.offset
            if "advance" in payload:
                self.offset += float(payload["advance"])
                current += float(payload["advance"])
            frozen = bool(payload.get("freeze", frozen))
            # Continue from `current` whether frozen or not (unfreezing does not jump).
            self.offset = current - time.time()
            self.frozen_at = current if frozen else None
            self.expire_old_events()
            now = self.now()
            return {"now": int(now), "now_iso": datetime.fromtimestamp(now, UTC).isoformat(),
                    "offset": self.offset, "frozen": frozen}

    # -- seeding -----------------------------------------------------------------

    def seed_data(self, seed, counts):
        """Deterministic objects for `seed`. They get no events: they predate the event horizon."""
        self.seed = seed
        self.ids = IdMaker(random.Random(seed * 7919 + 17))
        self.event_ids = IdMaker(random.Random(seed * 104729 + 3))
        self.admin_rng = random.Random(seed * 31 + 5)
        self.collections = {name: Collection(kind) for name, kind in KINDS.items()}
        self.events = EventLog()
        rng = random.Random(seed)
        end = int(self.cfg.base_time if self.cfg.base_time is not None else time.time()) - 3600
        self.builder = Builder(rng, self.ids, self.pick_for_seed(rng), self.lookup, end)

        def schedule(name, first=0, big=0):
            n = int(counts.get(name) or 0)
            return timestamp_schedule(rng, n, end, min(first, n), big)

        for t in schedule("products", first=5):
            self.collections["products"].put(self.builder.product(t))
        product_ids = [k[1] for k in self.collections["products"].keys]
        for i, t in enumerate(schedule("prices", first=10)):
            prod = product_ids[i % len(product_ids)] if product_ids else None
            self.collections["prices"].put(self.builder.price(t, product=prod))
        self.link_default_prices()
        n_customers = int(counts.get("customers") or 0)
        n_deleted = int(counts.get("deleted_customers") or 0)
        cust_times = timestamp_schedule(rng, n_customers + n_deleted, end, min(150, n_customers // 2),
                                        120 if n_customers >= 400 else 0)
        for t in cust_times:
            self.collections["customers"].put(self.builder.customer(t))
        for obj in rng.sample(list(self.collections["customers"].objects.values()), n_deleted):
            self.collections["customers"].deleted.add(obj["id"])
        for t in schedule("subscriptions", first=30):
            self.collections["subscriptions"].put(self.builder.subscription(t))
        self.seed_invoices(rng, schedule("invoices", first=30))
        self.seed_payments(rng, schedule("payment_intents", first=30), schedule("charges", first=30))

    def pick_for_seed(self, rng):
        def pick(name, recurring=False):
            coll = self.collections[name]
            keys = coll.keys
            for _ in range(50):
                if not keys:
                    return None
                obj = coll.objects[rng.choice(keys)[1]]
                if obj["id"] in coll.deleted:
                    continue
                if recurring and obj.get("type") != "recurring":
                    continue
                return obj["id"]
            return None
        return pick

    def link_default_prices(self):
        prices = self.collections["prices"]
        products = self.collections["products"]
        for _, price_id in prices.keys:
            price = prices.objects[price_id]
            prod = products.objects.get(price["product"])
            if prod is not None and prod["default_price"] is None:
                products.put(dict(prod, default_price=price_id))

    def seed_invoices(self, rng, times):
        subs = [k[1] for k in self.collections["subscriptions"].keys]
        for i, t in enumerate(times):
            sub = subs[i] if i < len(subs) and rng.random() < 0.7 else None
            inv, lines = self.builder.invoice(t, subscription=sub)
            self.collections["invoices"].put(inv)
            self.collections["invoices"].sublists[inv["id"]] = lines
            if sub:
                s = self.collections["subscriptions"].objects[sub]
                self.collections["subscriptions"].put(dict(s, latest_invoice=inv["id"]))

    def seed_payments(self, rng, pi_times, charge_times):
        invoices = self.collections["invoices"]
        paid = [invoices.objects[k[1]] for k in invoices.keys if invoices.objects[k[1]]["status"] == "paid"]
        pis = []
        for i, t in enumerate(pi_times):
            inv = paid[i] if i < len(paid) else None
            if inv:
                pi = self.builder.payment_intent(t, customer=inv["customer"], status="succeeded",
                                                 amount=inv["amount_due"] or 100, invoice=inv["id"])
                invoices.put(dict(inv, payment_intent=pi["id"]))
            else:
                pi = self.builder.payment_intent(t)
            self.collections["payment_intents"].put(pi)
            pis.append(pi)
        paying = [pi for pi in pis if pi["status"] in ("succeeded", "requires_capture")]
        for i, t in enumerate(charge_times):
            pi = paying[i] if i < len(paying) else None
            if pi:
                ch = self.builder.charge(t, customer=pi["customer"], status="succeeded", amount=pi["amount"],
                                         payment_intent=pi["id"], invoice=pi["invoice"])
                self.collections["payment_intents"].put(dict(pi, latest_charge=ch["id"],
                                                             payment_method=ch["payment_method"]))
                if pi["invoice"]:
                    inv = invoices.objects[pi["invoice"]]
                    invoices.put(dict(inv, charge=ch["id"]))
            else:
                ch = self.builder.charge(t)
            self.collections["charges"].put(ch)

    # -- reads -------------------------------------------------------------------

    def lookup(self, name, obj_id):
        """The stored object (deleted ones included) or None."""
        return self.collections[name].objects.get(obj_id) if obj_id else None

    def is_deleted(self, name, obj_id):
        return obj_id in self.collections[name].deleted

    def api_view(self, name, obj_id):
        """What GET /v1/{name}/{id} shows, or None for 404."""
        obj = self.lookup(name, obj_id)
        if obj is None:
            return None
        if self.is_deleted(name, obj_id):
            return {"id": obj_id, "object": obj["object"], "deleted": True} if name == "customers" else None
        return obj

    def pick_live(self, name, recurring=False):
        """A random live object id for admin-created links, newest objects favoured."""
        coll = self.collections[name]
        live = [k[1] for k in coll.keys[-500:] if k[1] not in coll.deleted
                and (not recurring or coll.objects[k[1]].get("type") == "recurring")]
        return self.admin_rng.choice(live) if live else None

    # -- events --------------------------------------------------------------------

    def emit(self, type_, obj, previous=None, created=None, automatic=False):
        """Record an event whose data.object is `obj` as it is now (objects are never mutated)."""
        data = {"object": obj}
        if previous is not None:
            data["previous_attributes"] = previous
        rng = self.admin_rng
        request = {"id": None, "idempotency_key": None} if automatic else {
            "id": "req_" + "".join(rng.choice(BASE62) for _ in range(14)),
            "idempotency_key": "%08x-%04x-4%03x-a%03x-%012x" % (
                rng.getrandbits(32), rng.getrandbits(16), rng.getrandbits(12), rng.getrandbits(12),
                rng.getrandbits(48))}
        with self.lock:
            targets = [ep for ep in self.endpoints.values() if ep["status"] == "enabled"
                       and ("*" in ep["enabled_events"] or type_ in ep["enabled_events"])]
            event = {"id": self.event_ids.new("evt_", 24), "object": "event",
                     "api_version": self.cfg.api_version,
                     "created": self.now_int() if created is None else int(created), "data": data,
                     "livemode": False, "pending_webhooks": len(targets), "request": request, "type": type_}
            self.events.add(event)
            for ep in targets:
                self.deliver(event["id"], ep)
        return event

    # -- webhooks --------------------------------------------------------------------

    def deliver(self, evt_id, ep):
        """Queue the delivery of an event to an endpoint (the sender's thread POSTs it)."""
        snapshot = self.events.json[evt_id]
        ep_id, type_ = ep["id"], self.events.events[evt_id]["type"]

        def build(attempt):
            with self.lock:
                current = self.endpoints.get(ep_id)
                if current is None:
                    return None         # endpoint deleted: Stripe stops delivering to it
                body = self.events.json.get(evt_id, snapshot)
                url, secret = current["url"], current["secret"]
            return url, body, webhook_headers(body, secret, int(time.time()))

        def on_result(attempt, status, ok, final):
            if ok:
                self.event_acknowledged(evt_id)

        self.webhooks.submit(build, {"event_id": evt_id, "endpoint_id": ep_id, "type": type_}, on_result,
                             url=ep["url"])

    def event_acknowledged(self, evt_id):
        """A 2xx from one endpoint: one webhook fewer pending (events are replaced, never mutated)."""
        with self.lock:
            event = self.events.events.get(evt_id)
            if event is not None and event["pending_webhooks"] > 0:
                event = dict(event, pending_webhooks=event["pending_webhooks"] - 1)
                self.events.events[evt_id] = event
                self.events.json[evt_id] = encode(event)

    def add_endpoint(self, url, enabled_events, secret=None, description=None, disabled=False, error=None):
        error = error or (lambda status, msg, param=None: AdminError(status, msg))
        check_endpoint_fields(url, enabled_events, error)
        with self.lock:
            if len(self.endpoints) >= MAX_WEBHOOK_ENDPOINTS:
                raise error(400, "You have reached the maximum of %d test webhook endpoints."
                            % MAX_WEBHOOK_ENDPOINTS, "url")
            if secret is None:
                secret = "whsec_" + "".join(self.request_rng.choice(BASE62) for _ in range(32))
            elif not isinstance(secret, str) or not secret:
                raise error(400, "secret must be a non-empty string", "secret")
            ep = {"id": "we_" + "".join(self.request_rng.choice(BASE62) for _ in range(24)),
                  "object": "webhook_endpoint", "api_version": None, "application": None,
                  "created": self.now_int(), "description": description,
                  "enabled_events": list(enabled_events), "livemode": False, "metadata": {},
                  "secret": secret, "status": "disabled" if disabled else "enabled", "url": url}
            self.endpoints[ep["id"]] = ep
            return dict(ep)

    def update_endpoint(self, ep_id, fields, error):
        with self.lock:
            ep = self.endpoints.get(ep_id)
            if ep is None:
                raise error(404, "No such webhook endpoint: '%s'" % ep_id, "id")
            new = dict(ep)
            if "url" in fields:
                new["url"] = fields["url"]
            if "enabled_events" in fields:
                new["enabled_events"] = list(fields["enabled_events"])
            if "description" in fields:
                new["description"] = fields["description"]
            if "disabled" in fields:
                new["status"] = "disabled" if fields["disabled"] else "enabled"
            check_endpoint_fields(new["url"], new["enabled_events"], error)
            self.endpoints[ep_id] = new
            return dict(new)

    def delete_endpoint(self, ep_id, error):
        with self.lock:
            if self.endpoints.pop(ep_id, None) is None:
                raise error(404, "No such webhook endpoint: '%s'" % ep_id, "id")
            return {"id": ep_id, "object": "webhook_endpoint", "deleted": True}

    def expire_old_events(self):
        return self.events.purge_before(self.now_int() - EVENT_RETENTION)

    # -- writes (admin) ------------------------------------------------------------

    def collection(self, name):
        coll = self.collections.get(name)
        if coll is None:
            raise AdminError(404, "unknown kind %r (one of %s)" % (name, ", ".join(KINDS)))
        return coll

    def live_object(self, name, obj_id):
        obj = self.lookup(name, obj_id)
        if obj is None or self.is_deleted(name, obj_id):
            raise AdminError(404, "no live %s %s" % (KINDS[name].obj, obj_id))
        return obj

    def check_links(self, name, fields):
        """Ids put into link fields must name live objects of the right kind."""
        for (obj_name, field), target in EXPANDABLE.items():
            if obj_name == KINDS[name].obj and isinstance(fields.get(field), str):
                self.live_object(target, fields[field])

    def create(self, name, fields, automatic=False):
        with self.lock:
            coll = self.collection(name)
            fields = dict(fields)
            created = int(fields.pop("created", self.now_int()))
            self.check_links(name, fields)
            obj, lines = self.build_new(name, created, fields)
            extra = sorted(set(fields) - set(obj))
            if extra:
                raise AdminError(400, "unknown %s field(s): %s" % (KINDS[name].obj, ", ".join(extra)))
            if "id" in fields:
                if not fields["id"].startswith(KINDS[name].prefix) or fields["id"] in coll.objects:
                    raise AdminError(400, "id must be new and start with %s" % KINDS[name].prefix)
            if "metadata" in fields:
                obj["metadata"] = {}        # created with exactly the metadata given
            obj = merge_fields(obj, fields)
            coll.put(obj)
            if lines is not None:
                coll.sublists[obj["id"]] = lines
            self.after_create_links(name, obj)
            for type_ in creation_event_types(KINDS[name], obj):
                self.emit(type_, obj, created=created, automatic=automatic)
            return obj

    def build_new(self, name, created, fields):
        """Default object for an admin create (admin-only helper keys are consumed here)."""
        b = Builder(self.admin_rng, self.ids, self.pick_live, self.lookup, created)
        if name == "customers":
            return b.customer(created), None
        if name == "products":
            return b.product(created), None
        if name == "prices":
            return b.price(created, product=fields.get("product") or self.pick_live("products")), None
        if name == "subscriptions":
            prices = fields.pop("prices", None) or ([fields.pop("price")] if "price" in fields else None)
            for p in prices or []:
                self.live_object("prices", p)
            if prices is None and self.pick_live("prices", recurring=True) is None:
                raise AdminError(400, "create a recurring price first (or pass price)")
            return b.subscription(created, customer=fields.get("customer") or self.pick_live("customers"),
                                  price_ids=prices, status=fields.get("status")), None
        if name == "invoices":
            line_count = fields.pop("line_count", None)
            customer = fields.get("customer") or self.pick_live("customers")
            if customer is None:
                raise AdminError(400, "create a customer first (or pass customer)")
            return b.invoice(created, customer=customer, subscription=fields.get("subscription"),
                             status=fields.get("status") or "draft",
                             line_count=None if line_count is None else int(line_count))
        if name == "payment_intents":
            return b.payment_intent(created, customer=fields.get("customer"), status=fields.get("status"),
                                    amount=fields.get("amount")), None
        return b.charge(created, customer=fields.get("customer"), status=fields.get("status"),
                        amount=fields.get("amount")), None

    def after_create_links(self, name, obj):
        """Keep back-links Stripe maintains (product.default_price, subscription.latest_invoice)."""
        if name == "prices":
            prod = self.lookup("products", obj["product"])
            if prod is not None and prod["default_price"] is None:
                self.collections["products"].put(dict(prod, default_price=obj["id"]))
        if name == "invoices" and obj.get("subscription"):
            sub = self.lookup("subscriptions", obj["subscription"])
            self.collections["subscriptions"].put(dict(sub, latest_invoice=obj["id"]))

    def update(self, name, obj_id, fields, automatic=False):
        with self.lock:
            coll = self.collection(name)
            old = self.live_object(name, obj_id)
            bad = sorted(set(fields) & IMMUTABLE) + sorted(set(fields) - set(old))
            if bad:
                raise AdminError(400, "cannot set %s field(s): %s" % (KINDS[name].obj, ", ".join(bad)))
            self.check_links(name, fields)
            new = merge_fields(old, fields)
            if not previous_attributes(old, new):
                return old                  # nothing changed: Stripe emits no event
            self.apply_transition(name, old, new, fields, self.now_int())
            previous = previous_attributes(old, new)
            coll.put(new)
            for type_ in update_event_types(KINDS[name], old, new):
                self.emit(type_, new, previous=previous, automatic=automatic)
            return new

    def apply_transition(self, name, old, new, fields, at):
        """Fill the fields Stripe sets when a status changes (unless the caller set them)."""
        if name == "products":
            new["updated"] = at
        if "status" not in fields or old.get("status") == new["status"]:
            return
        keep = {k: new[k] for k in fields}
        if name == "invoices":
            apply_invoice_status(new, new["status"], at, self.lookup("customers", new["customer"]))
        elif name == "subscriptions":
            apply_subscription_status(new, new["status"], at)
        elif name == "payment_intents":
            apply_payment_intent_status(new, new["status"], at)
        elif name == "charges":
            new["paid"] = new["captured"] = new["status"] == "succeeded"
            new["amount_captured"] = new["amount"] if new["status"] == "succeeded" else 0
        new.update(keep)

    def delete(self, name, obj_id, automatic=False):
        with self.lock:
            coll = self.collection(name)
            obj = self.live_object(name, obj_id)
            if name == "subscriptions":
                # DELETE /v1/subscriptions/{id} cancels: the subscription stays retrievable.
                return self.update(name, obj_id, {"status": "canceled"}, automatic=automatic)
            if name in ("charges", "payment_intents"):
                raise AdminError(400, "Stripe cannot delete %s (refund or cancel instead)" % name)
            if name == "invoices" and obj["status"] != "draft":
                raise AdminError(400, "only draft invoices can be deleted (void this one instead)")
            if name == "products":
                prices = self.collections["prices"]
                if any(p["product"] == obj_id and p["id"] not in prices.deleted for p in prices.objects.values()):
                    raise AdminError(400, "This product cannot be deleted because it has one or more "
                                          "user-created prices.")
            if name == "customers":
                self.cancel_subscriptions_of(obj_id)
            coll.deleted.add(obj_id)
            self.emit(KINDS[name].event_prefix + ".deleted", obj, automatic=automatic)
            return {"id": obj_id, "object": obj["object"], "deleted": True}

    def cancel_subscriptions_of(self, customer_id):
        """Deleting a customer cancels its subscriptions first, as Stripe does."""
        subs = self.collections["subscriptions"]
        for sub in list(subs.objects.values()):
            if sub["customer"] == customer_id and sub["status"] not in ("canceled", "incomplete_expired"):
                self.update("subscriptions", sub["id"], {"status": "canceled"}, automatic=True)

    def bulk_create(self, name, count, fields, created):
        with self.lock:
            created = self.now_int() if created is None else int(created)
            ids = [self.create(name, dict(fields, created=created))["id"] for _ in range(count)]
            return {"ids": ids, "created": created}

    # -- keys ------------------------------------------------------------------------

    def authenticate(self, header):
        """The key record for an Authorization header value; raises StripeError 401."""
        if not header:
            raise StripeError(401, NO_KEY_MESSAGE)
        scheme, _, value = header.strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "basic":
            try:
                value = base64.b64decode(value, validate=True).decode().partition(":")[0]
            except (ValueError, UnicodeDecodeError):
                value = ""
        elif scheme.lower() != "bearer":
            value = ""
        if not value:
            raise StripeError(401, "You did not provide an API key, though you did set your Authorization "
                                   "header to \"%s\". Using Bearer auth, your Authorization header should look "
                                   "something like 'Authorization: Bearer YOUR_SECRET_KEY'. See "
                                   "https://stripe.com/docs/api#authentication for details, or we can help at "
                                   "https://support.stripe.com/." % header.strip())
        with self.lock:
            rec = self.keys.get(value)
        if rec is None:
            raise StripeError(401, "Invalid API Key provided: %s" % mask_key(value))
        if rec["state"] == "expired":
            raise StripeError(401, "Expired API Key provided: %s" % mask_key(value), code="api_key_expired")
        return rec

    def add_key(self, payload):
        with self.lock:
            restricted = bool(payload.get("restricted"))
            key = payload.get("key") or (("rk_test_" if restricted else "sk_test_") + "".join(
                self.request_rng.choice(BASE62) for _ in range(99)))
            if not re.match(r"^(sk|rk)_test_[0-9A-Za-z]+$", key) or key.startswith("rk_") != restricted:
                raise AdminError(400, "key must look like sk_test_... (or rk_test_... with restricted: true)")
            perms = payload.get("permissions")
            if perms is not None:
                unknown = set(perms) - set(KINDS) - {"events", "webhook_endpoints"}
                if unknown:
                    raise AdminError(400, "unknown permission(s): %s" % ", ".join(sorted(unknown)))
            rec = {"key": key, "restricted": restricted, "permissions": sorted(perms or []) if restricted else None,
                   "state": "active"}
            self.keys[key] = rec
            return rec

    # -- faults and logs -----------------------------------------------------------------

    def take_fault(self, target):
        with self.lock:
            return fault_pick(self.faults, target)

    def log_request(self, entry, endpoint):
        with self.lock:
            self.request_log.append(entry)
            if len(self.request_log) > 100000:
                del self.request_log[:50000]
            self.endpoint_counts[endpoint] = self.endpoint_counts.get(endpoint, 0) + 1

    def new_request_id(self):
        return "req_" + "".join(self.request_rng.choice(BASE62) for _ in range(14))


def parse_when(value):
    """Unix seconds from a number or an ISO-8601 string (admin input)."""
    if isinstance(value, (int, float)):
        return float(value)
    try:
        dt = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise AdminError(400, "bad time %r (unix seconds or ISO-8601)" % (value,))
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


def webhook_signature(body, secret, timestamp):
    """hex HMAC-SHA256 of '<t>.<body>' keyed by the endpoint secret (the whole whsec_ string)."""
    return hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def webhook_headers(body, secret, timestamp, signature=None):
    if signature is None:
        signature = "t=%d,v1=%s,v0=%s" % (timestamp, webhook_signature(body, secret, timestamp),
                                          hmac.new(WEBHOOK_V0_KEY, str(timestamp).encode() + b"." + body,
                                                   hashlib.sha256).hexdigest())
    return {"Content-Type": WEBHOOK_CONTENT_TYPE, "User-Agent": WEBHOOK_USER_AGENT,
            "Cache-Control": "no-cache", "Accept": "*/*; q=0.5, application/xml",
            "Stripe-Signature": signature}


def check_endpoint_fields(url, enabled_events, error):
    """Stripe's checks on a webhook endpoint's url and enabled_events; error(status, message, param)."""
    if not isinstance(url, str) or not re.match(r"^https?://[^/\s]+", url or ""):
        raise error(400, "Invalid URL: %s" % (url,), "url")
    if not isinstance(enabled_events, list) or not enabled_events:
        raise error(400, "Missing required param: enabled_events.", "enabled_events")
    for i, name in enumerate(enabled_events):
        if not isinstance(name, str) or not (name == "*" or EVENT_TYPE_RE.match(name)):
            raise error(400, "Invalid enabled_events[%d]: must be '*' or an event type (%r)" % (i, name),
                        "enabled_events[%d]" % i)


def merge_fields(old, fields):
    """A new object: fields replace top-level values; metadata merges like Stripe's
    (a null or empty value removes that key)."""
    new = copy.deepcopy(old)
    for key, value in fields.items():
        if key == "metadata" and isinstance(value, dict):
            md = dict(new.get("metadata") or {})
            for mk, mv in value.items():
                if mv in (None, ""):
                    md.pop(mk, None)
                else:
                    md[mk] = str(mv)
            new["metadata"] = md
        else:
            new[key] = value
    return new


def previous_attributes(old, new):
    """data.previous_attributes: old values of changed fields (for metadata, of changed keys)."""
    prev = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "metadata" and isinstance(a, dict) and isinstance(b, dict):
            prev[key] = {mk: a.get(mk) for mk in sorted(set(a) | set(b)) if a.get(mk) != b.get(mk)}
        else:
            prev[key] = a
    return prev


INVOICE_TRANSITION_EVENTS = {"paid": ["invoice.paid", "invoice.payment_succeeded"],
                             "void": ["invoice.voided"], "uncollectible": ["invoice.marked_uncollectible"]}
PI_STATUS_EVENTS = {"succeeded": "payment_intent.succeeded", "canceled": "payment_intent.canceled",
                    "processing": "payment_intent.processing", "requires_action": "payment_intent.requires_action",
                    "requires_capture": "payment_intent.amount_capturable_updated",
                    "requires_payment_method": "payment_intent.payment_failed"}


def creation_event_types(kind, obj):
    """Events Stripe emits when an object comes into being (in order)."""
    if kind.name == "charges":
        return ["charge." + obj["status"]]          # there is no charge.created
    types = [kind.event_prefix + ".created"]
    if kind.name == "invoices" and obj["status"] != "draft":
        types.append("invoice.finalized")
        types += INVOICE_TRANSITION_EVENTS.get(obj["status"], [])
    if kind.name == "payment_intents" and obj["status"] in PI_STATUS_EVENTS \
            and obj["status"] != "requires_payment_method":
        types.append(PI_STATUS_EVENTS[obj["status"]])
    return types


def update_event_types(kind, old, new):
    """Events Stripe emits for an update (in order). PaymentIntents have no *.updated event:
    changing only their metadata or description emits nothing."""
    status_changed = old.get("status") != new.get("status")
    if kind.name == "payment_intents":
        return [PI_STATUS_EVENTS[new["status"]]] if status_changed and new["status"] in PI_STATUS_EVENTS else []
    if kind.name == "charges":
        if new["refunded"] and not old["refunded"]:
            return ["charge.refunded"]
        if new["captured"] and not old["captured"] and not status_changed:
            return ["charge.captured"]
        if status_changed and new["status"] in ("succeeded", "failed", "pending"):
            return ["charge." + new["status"]]
        return ["charge.updated"]
    if kind.name == "subscriptions" and status_changed:
        if new["status"] == "canceled":
            return ["customer.subscription.deleted"]   # ".deleted" means canceled; the object stays
        if new["status"] == "paused":
            return ["customer.subscription.updated", "customer.subscription.paused"]
        if old["status"] == "paused":
            return ["customer.subscription.updated", "customer.subscription.resumed"]
    types = [kind.event_prefix + ".updated"]
    if kind.name == "invoices" and status_changed:
        if old["status"] == "draft" and new["status"] != "draft":
            types.append("invoice.finalized")
        types += INVOICE_TRANSITION_EVENTS.get(new["status"], [])
    return types


# ----------------------------------------------------------------------------
# Query parameters (Rack-style: a=1, a[]=x, a[0]=x, a[b]=y)
# ----------------------------------------------------------------------------

PARAM_RE = re.compile(r"^([A-Za-z0-9_]+)(?:\[([A-Za-z0-9_]*)\])?$")


def parse_params(query):
    params = {}
    for raw_key, value in parse_qsl(query, keep_blank_values=True):
        m = PARAM_RE.match(raw_key)
        if not m:
            raise unknown_parameter(raw_key)
        name, sub = m.group(1), m.group(2)
        if sub is None:
            if isinstance(params.get(name), (list, dict)):
                raise invalid("Invalid %s: must be a scalar" % name, param=name)
            params[name] = value
        elif sub == "" or sub.isdigit():
            current = params.setdefault(name, [])
            if not isinstance(current, list):
                raise invalid("Invalid array", param=name)
            current.append(value)
        else:
            current = params.setdefault(name, {})
            if not isinstance(current, dict):
                raise invalid("Invalid hash", param=name)
            current[sub] = value
    return params


def check_params(params, allowed):
    for name in params:
        if name not in allowed:
            value = params[name]
            raise unknown_parameter(name + ("[%s]" % next(iter(value)) if isinstance(value, dict) and value
                                            else ""))
    for name, value in params.items():
        if value == "":
            raise invalid("You passed an empty string for '%s'. We assume empty values are an attempt to unset a "
                          "parameter; however '%s' cannot be unset. You should remove '%s' from your request or "
                          "supply a non-empty value." % (name, name, name), param=name)


def scalar(params, name):
    value = params.get(name)
    if isinstance(value, (list, dict)):
        raise invalid("Invalid %s: must be a string" % name, param=name)
    return value


def parse_int(value, param):
    if not re.fullmatch(r"-?\d+", value or ""):
        raise invalid("Invalid integer: %s" % value, param=param)
    return int(value)


def parse_bool(value, param):
    if value not in ("true", "false"):
        raise invalid("Invalid boolean: %s" % value, param=param)
    return value == "true"


def parse_limit(params):
    value = scalar(params, "limit")
    if value is None:
        return DEFAULT_LIMIT
    limit = parse_int(value, "limit")
    if limit < 1:
        raise invalid("This value must be greater than or equal to 1.", param="limit")
    if limit > MAX_LIMIT:
        raise invalid("This value must be less than or equal to %d." % MAX_LIMIT, param="limit")
    return limit


def parse_created(params):
    """created=ts or created[gt|gte|lt|lte]=ts -> (low_inclusive, high_exclusive), None = open."""
    value = params.get("created")
    if value is None:
        return None, None
    if isinstance(value, list):
        raise invalid("Invalid created: must be an integer or a hash", param="created")
    if isinstance(value, str):
        ts = parse_int(value, "created")
        return ts, ts + 1
    low = high = None
    for op, raw in value.items():
        if op not in ("gt", "gte", "lt", "lte"):
            raise unknown_parameter("created[%s]" % op)
        ts = parse_int(raw, "created[%s]" % op)
        if op in ("gt", "gte"):
            bound = ts + 1 if op == "gt" else ts
            low = bound if low is None else max(low, bound)
        else:
            bound = ts if op == "lt" else ts + 1
            high = bound if high is None else min(high, bound)
    return low, high


def parse_expand(params):
    value = params.get("expand")
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid("Invalid array", param="expand")
    for path in value:
        if len(path.split(".")) > MAX_EXPAND_DEPTH + (1 if path.startswith("data.") else 0):
            raise invalid("You cannot expand more than %d levels of a property. Property: %s"
                          % (MAX_EXPAND_DEPTH, path), param="expand")
    return value


def cursor_params(params):
    after, before = scalar(params, "starting_after"), scalar(params, "ending_before")
    if after is not None and before is not None:
        raise invalid("You may only specify one of these parameters: ending_before, starting_after.",
                      param="ending_before")
    return after, before


# ----------------------------------------------------------------------------
# Lists
# ----------------------------------------------------------------------------

def created_bounds(keys, low, high):
    """Index range [lo, hi) of ascending keys (created first) within a created range."""
    lo = 0 if low is None else bisect.bisect_left(keys, (low,))
    hi = len(keys) if high is None else bisect.bisect_left(keys, (high,))
    return lo, hi


def select_page(keys, lo, hi, limit, accept, after_idx=None, before_idx=None):
    """Indexes of one newest-first page of ascending `keys`, and has_more.

    Without a cursor, or with starting_after: walk down from the newest (or from just
    below the cursor). With ending_before: take the `limit` matches just above the
    cursor (the ones closest to it) and show them newest first; has_more then says
    that still newer objects exist."""
    picked = []
    if before_idx is None:
        i = (hi if after_idx is None else min(hi, after_idx)) - 1
        while i >= lo and len(picked) <= limit:
            if accept(keys[i]):
                picked.append(i)
            i -= 1
        return picked[:limit], len(picked) > limit
    i = max(lo, before_idx + 1)
    while i < hi and len(picked) <= limit:
        if accept(keys[i]):
            picked.append(i)
        i += 1
    has_more = len(picked) > limit
    picked = picked[:limit]
    picked.reverse()
    return picked, has_more


def list_body(parts, has_more, url):
    return (b'{"object":"list","data":[' + b",".join(parts) + b'],"has_more":'
            + (b"true" if has_more else b"false") + b',"url":' + encode(url) + b"}")


def subscription_filter(status):
    if status is None:
        return lambda s: s["status"] != "canceled"
    if status == "all":
        return lambda s: True
    if status == "ended":
        return lambda s: s["status"] in ("canceled", "incomplete_expired")
    if status not in SUBSCRIPTION_STATUSES:
        raise invalid("Invalid status: must be one of active, past_due, unpaid, canceled, incomplete, "
                      "incomplete_expired, trialing, paused, all, or ended", param="status")
    return lambda s: s["status"] == status


def equals(field, value):
    return lambda o: o.get(field) == value


def list_filters(kind_name, params):
    """Per-list filters: (allowed parameter names, predicates on the object)."""
    preds = []

    def text(name, field=None):
        value = scalar(params, name)
        if value is not None:
            preds.append(equals(field or name, value))

    def boolean(name):
        value = scalar(params, name)
        if value is not None:
            preds.append(equals(name, parse_bool(value, name)))

    allowed = set()
    if kind_name == "customers":
        allowed = {"email"}
        text("email")
    elif kind_name == "charges":
        allowed = {"customer", "payment_intent"}
        text("customer")
        text("payment_intent")
    elif kind_name == "invoices":
        allowed = {"customer", "subscription", "status", "collection_method"}
        for name in sorted(allowed):
            text(name)
        status = scalar(params, "status")
        if status is not None and status not in ("draft", "open", "paid", "uncollectible", "void"):
            raise invalid("Invalid status: must be one of draft, open, paid, uncollectible, or void",
                          param="status")
    elif kind_name == "subscriptions":
        allowed = {"customer", "price", "status", "collection_method"}
        text("customer")
        text("collection_method")
        price = scalar(params, "price")
        if price is not None:
            preds.append(lambda s: any(i["price"]["id"] == price for i in s["items"]["data"]))
        preds.append(subscription_filter(scalar(params, "status")))
    elif kind_name == "products":
        allowed = {"active", "ids"}
        boolean("active")
        ids = params.get("ids")
        if ids is not None:
            if not isinstance(ids, list):
                raise invalid("Invalid array", param="ids")
            wanted = set(ids)
            preds.append(lambda o: o["id"] in wanted)
    elif kind_name == "prices":
        allowed = {"active", "product", "type", "currency"}
        boolean("active")
        text("product")
        text("type")
        text("currency")
    elif kind_name == "payment_intents":
        allowed = {"customer"}
        text("customer")
    return allowed, preds


COMMON_LIST_PARAMS = {"limit", "starting_after", "ending_before", "expand", "created"}


def event_type_filter(params):
    type_, types = params.get("type"), params.get("types")
    if type_ is not None and types is not None:
        raise invalid("You may only specify one of these parameters: type, types.", param="type")
    if type_ is not None:
        if not isinstance(type_, str):
            raise invalid("Invalid type: must be a string", param="type")
        return lambda e: fnmatch.fnmatchcase(e["type"], type_)
    if types is not None:
        if not isinstance(types, list):
            raise invalid("Invalid array", param="types")
        if len(types) > MAX_TYPES:
            raise invalid("Invalid array: must have at most %d elements" % MAX_TYPES, param="types")
        wanted = set(types)
        return lambda e: e["type"] in wanted
    return None


# ----------------------------------------------------------------------------
# Expansion
# ----------------------------------------------------------------------------

def expand_path(account, obj, parts, full):
    """A copy of obj with the id at parts[0] replaced by that object, recursively."""
    field = parts[0]
    target_kind = EXPANDABLE.get((obj.get("object"), field))
    if target_kind is None:
        raise invalid("This property cannot be expanded (%s)." % full, param="expand")
    obj = dict(obj)
    value = obj.get(field)
    if isinstance(value, str):
        value = account.api_view(target_kind, value) or value
    if isinstance(value, dict) and len(parts) > 1 and not value.get("deleted"):
        value = expand_path(account, value, parts[1:], full)
    obj[field] = value
    return obj


def render(account, obj, expand, strip_data=False):
    """JSON bytes for obj with `expand` paths applied (list paths start with 'data.')."""
    for path in expand:
        parts = path.split(".")
        if strip_data:
            if parts[0] != "data" or len(parts) < 2:
                raise invalid("This property cannot be expanded (%s)." % path, param="expand")
            parts = parts[1:]
        obj = expand_path(account, obj, parts, path)
    return encode(obj)


# ----------------------------------------------------------------------------
# HTTP handler
# ----------------------------------------------------------------------------

ROUTES = [
    (re.compile(r"^/v1/events$"), "events_list"),
    (re.compile(r"^/v1/events/([^/]+)$"), "event_get"),
    (re.compile(r"^/v1/invoices/([^/]+)/lines$"), "invoice_lines"),
    (re.compile(r"^/v1/(%s)$" % "|".join(KINDS)), "object_list"),
    (re.compile(r"^/v1/(%s)/([^/]+)$" % "|".join(KINDS)), "object_get"),
    (re.compile(r"^/v1/webhook_endpoints$"), "webhook_endpoints"),
    (re.compile(r"^/v1/webhook_endpoints/([^/]+)$"), "webhook_endpoint"),
]
WRITE_ROUTES = {"webhook_endpoints": ("GET", "POST"), "webhook_endpoint": ("GET", "POST", "DELETE")}
API_VERSION_RE = re.compile(r"^\d{4}-\d{2}-\d{2}(\.[a-z]+)?$")


class Handler(FaultDelivery, BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "nginx"
    account: Account = None       # set by main()
    verbose = False

    # -- plumbing --------------------------------------------------------------

    def version_string(self):
        return self.server_version

    def log_message(self, fmt, *args):
        if self.verbose:
            sys.stderr.write("fake_stripe: " + (fmt % args) + "\n")

    def date_time_string(self, timestamp=None):
        """Date follows the (possibly shifted) server clock; clients read server time from it."""
        return email.utils.formatdate(self.account.now(), usegmt=True)

    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def do_PATCH(self):
        self.dispatch("PATCH")

    def do_DELETE(self):
        self.dispatch("DELETE")

    def read_body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def send(self, status, body, headers=None):
        """Write a complete response (always with Content-Length, so keep-alive works)."""
        fault, self.answer_fault = getattr(self, "answer_fault", None), None
        if fault is not None:
            self.send_faulted(fault, status, body, JSON_TYPE, headers)
            return
        self.send_response(status)
        self.send_header("Content-Type", JSON_TYPE)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.status_sent = status

    def dispatch(self, method):
        self.status_sent = 0
        self.answer_fault = self.stall_until = None
        split = urlsplit(self.path)
        path, query = split.path, split.query
        body = self.read_body()         # always drained, so keep-alive stays in step
        self.request_body = body
        if path == "/__admin" or path.startswith("/__admin/"):
            self.handle_admin(method, path, query, body)
            return
        started = time.time()
        request_id = self.account.new_request_id()
        endpoint = classify(method, path)
        try:
            self.handle_api(method, path, query, request_id, endpoint)
            self.finish_fault()
        finally:
            self.account.log_request({"t": started, "method": method, "path": path, "query": query,
                                      "status": self.status_sent, "request_id": request_id}, endpoint)

    # -- public API ----------------------------------------------------------------

    def handle_api(self, method, path, query, request_id, endpoint):
        acct = self.account
        headers = {"Request-Id": request_id, "Cache-Control": "no-cache, no-store",
                   "Stripe-Version": acct.cfg.api_version}
        fault = acct.take_fault(path + ("?" + query if query else ""))
        if fault and self.apply_fault(fault, headers):
            return
        admitted = False
        try:
            version = self.headers.get("Stripe-Version")
            if version is not None:
                if not API_VERSION_RE.match(version.strip()):
                    raise invalid("Invalid Stripe API version: %s" % version)
                headers["Stripe-Version"] = version.strip()
            key = acct.authenticate(self.headers.get("Authorization"))
            route, args = match_route(path)
            if route is None or method not in WRITE_ROUTES.get(route, ("GET",)):
                # The fake's public API is read-only (but for webhook endpoints); writes go through /__admin.
                raise unrecognized_url(method, path)
            reason = acct.limiter.admit(endpoint)
            if reason:
                raise StripeError(429, RATE_LIMIT_MESSAGE, code="rate_limit",
                                  headers={"Stripe-Rate-Limited-Reason": reason})
            admitted = True
            check_permission(key, route, args)
            params = parse_params(query)
            if route in WRITE_ROUTES:
                payload = getattr(self, route)(method, params, *args)
            else:
                payload = getattr(self, route)(params, *args)
            self.send(200, payload, headers)
        except StripeError as e:
            headers.update(e.headers)
            if e.status == 401:
                headers["WWW-Authenticate"] = 'Basic realm="Stripe"'
            self.send(e.status, encode(e.body(request_id, acct.now_int())), headers)
        except Exception:
            # A bug in the fake must show up as a loud 500, not as a silently dropped connection.
            traceback.print_exc()
            err = StripeError(500, "An unknown error occurred", type_="api_error")
            self.send(500, encode(err.body(request_id, acct.now_int())), headers)
        finally:
            if admitted:
                acct.limiter.release()

    def apply_fault(self, fault, headers):
        """Inject a configured failure. Returns True when the request was fully handled; False:
        answer normally (a fault on the real answer is then applied by send())."""
        if fault.get("delay"):
            time.sleep(float(fault["delay"]))
        if fault.get("reset"):
            self.reset_connection()
            return True
        if fault.get("drop"):
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return True
        if fault_on_real_answer(fault):
            self.answer_fault = fault
            return False
        status = fault.get("status") or (200 if fault.get("body_b64") is not None else None)
        if not status:
            return False            # delay-only fault: now answer normally
        if fault.get("body_b64") is not None:
            payload = base64.b64decode(fault["body_b64"])
        elif fault.get("body") is not None:
            body = fault["body"]
            payload = body.encode() if isinstance(body, str) else encode(body)
        else:
            err = default_error(status)
            headers.update(err.headers)
            payload = encode(err.body(headers["Request-Id"], self.account.now_int()))
        headers.update(fault.get("headers") or {})
        if fault.get("truncate") or fault.get("stall") or fault.get("corrupt") or fault.get("content_type"):
            self.send_faulted(fault, status, payload, fault.get("content_type") or JSON_TYPE, headers)
            return True
        self.send(status, payload, headers)
        return True

    def fault_log(self, status):
        self.status_sent = status

    def fault_owner(self):
        return self.account

    def send_whole(self, status, payload, ctype, headers):
        self.send(status, payload, headers)

    def object_list(self, params, kind_name):
        acct = self.account
        allowed, preds = list_filters(kind_name, params)
        check_params(params, COMMON_LIST_PARAMS | allowed)
        limit = parse_limit(params)
        expand = parse_expand(params)
        low, high = parse_created(params)
        after, before = cursor_params(params)
        kind = KINDS[kind_name]
        with acct.lock:
            coll = acct.collections[kind_name]
            keys = coll.keys
            lo, hi = created_bounds(keys, low, high)
            after_idx = self.cursor_index(kind_name, after, "starting_after")
            before_idx = self.cursor_index(kind_name, before, "ending_before")

            def accept(key):
                if key[1] in coll.deleted:
                    return False
                obj = coll.objects[key[1]]
                return all(p(obj) for p in preds)

            picked, has_more = select_page(keys, lo, hi, limit, accept, after_idx, before_idx)
            ids = [keys[i][1] for i in picked]
            if expand:
                parts = [render(acct, coll.objects[i], expand, strip_data=True) for i in ids]
            else:
                parts = [coll.encoded(i) for i in ids]
        return list_body(parts, has_more, "/v1/" + kind.name)

    def cursor_index(self, kind_name, obj_id, param):
        """Index of a cursor object; unknown (or non-retrievable) ids are a 400 resource_missing."""
        if obj_id is None:
            return None
        acct = self.account
        if acct.api_view(kind_name, obj_id) is None:
            raise no_such(KINDS[kind_name].noun, obj_id, param, 400)
        return acct.collections[kind_name].index_of(obj_id)

    def object_get(self, params, kind_name, obj_id):
        check_params(params, {"expand"})
        expand = parse_expand(params)
        acct = self.account
        with acct.lock:
            view = acct.api_view(kind_name, obj_id)
            if view is None:
                raise no_such(KINDS[kind_name].noun, obj_id, "id", 404)
            if view.get("deleted"):
                return encode(view)
            if expand:
                return render(acct, view, expand)
            return acct.collections[kind_name].encoded(obj_id)

    def invoice_lines(self, params, inv_id):
        check_params(params, {"limit", "starting_after", "ending_before", "expand"})
        if parse_expand(params):
            raise invalid("This property cannot be expanded (%s)." % params["expand"][0], param="expand")
        limit = parse_limit(params)
        after, before = cursor_params(params)
        acct = self.account
        with acct.lock:
            if acct.api_view("invoices", inv_id) is None:
                raise no_such("invoice", inv_id, "invoice", 404)
            lines = acct.collections["invoices"].sublists.get(inv_id, [])
            ids = [line["id"] for line in lines]
            cursor = after or before
            if cursor is not None and cursor not in ids:
                raise invalid("Invoice %s does not have a line item %s" % (inv_id, cursor),
                              param="starting_after" if after else "ending_before")
            # Lines keep invoice order (first line first), unlike top-level lists.
            if before is not None:
                end = ids.index(before)
                page = lines[max(0, end - limit):end]
                has_more = end - limit > 0
            else:
                start = ids.index(after) + 1 if after else 0
                page = lines[start:start + limit]
                has_more = start + limit < len(lines)
            parts = [encode(line) for line in page]
        return list_body(parts, has_more, "/v1/invoices/%s/lines" % inv_id)

    def events_list(self, params):
        acct = self.account
        check_params(params, {"limit", "starting_after", "ending_before", "expand", "created", "type", "types",
                              "delivery_success"})
        limit = parse_limit(params)
        if parse_expand(params):
            raise invalid("This property cannot be expanded (%s)." % params["expand"][0], param="expand")
        low, high = parse_created(params)
        after, before = cursor_params(params)
        type_ok = event_type_filter(params)
        delivered = scalar(params, "delivery_success")
        delivered = None if delivered is None else parse_bool(delivered, "delivery_success")
        with acct.lock:
            acct.expire_old_events()
            log = acct.events
            keys = log.keys
            lo, hi = created_bounds(keys, low, high)
            idx = {}
            for name, value in (("starting_after", after), ("ending_before", before)):
                if value is not None:
                    idx[name] = log.index_of(value)
                    if idx[name] is None:
                        raise no_such("event", value, name, 400)

            def accept(key):
                event = log.events[key[2]]
                if type_ok is not None and not type_ok(event):
                    return False
                return delivered is None or (event["pending_webhooks"] == 0) == delivered

            picked, has_more = select_page(keys, lo, hi, limit, accept, idx.get("starting_after"),
                                           idx.get("ending_before"))
            parts = [log.json[keys[i][2]] for i in picked]
        return list_body(parts, has_more, "/v1/events")

    def event_get(self, params, evt_id):
        check_params(params, {"expand"})
        acct = self.account
        with acct.lock:
            acct.expire_old_events()
            data = acct.events.json.get(evt_id)
        if data is None:
            raise no_such("event", evt_id, "id", 404)
        return data

    # -- webhook endpoints (public API) ------------------------------------------------

    def form_params(self, params):
        """A write's parameters: the query's plus the form-encoded body's (Stripe reads both)."""
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        body = self.request_body or b""
        if body and ctype not in ("", "application/x-www-form-urlencoded"):
            raise invalid("Invalid request: the body must be form-encoded "
                          "(Content-Type: application/x-www-form-urlencoded)")
        merged = dict(params)
        merged.update(parse_params(body.decode("utf-8", "replace")))
        return merged

    def webhook_endpoints(self, method, params):
        acct = self.account
        if method == "GET":
            check_params(params, {"limit", "starting_after", "ending_before"})
            limit = parse_limit(params)
            after, before = cursor_params(params)
            with acct.lock:
                eps = [public_endpoint(ep) for ep in reversed(list(acct.endpoints.values()))]
            ids = [ep["id"] for ep in eps]
            for name, value in (("starting_after", after), ("ending_before", before)):
                if value is not None and value not in ids:
                    raise no_such("webhook endpoint", value, name, 400)
            if after is not None:
                rest = eps[ids.index(after) + 1:]
                page, more = rest[:limit], len(rest) > limit
            elif before is not None:
                rest = eps[:ids.index(before)]
                page, more = rest[-limit:], len(rest) > limit
            else:
                page, more = eps[:limit], len(eps) > limit
            return list_body([encode(ep) for ep in page], more, "/v1/webhook_endpoints")
        params = self.form_params(params)
        check_params(params, {"url", "enabled_events", "description", "metadata", "api_version", "connect",
                              "expand"})
        url = scalar(params, "url")
        if url is None:
            raise invalid("Missing required param: url.", param="url")
        events = params.get("enabled_events")
        if events is None:
            raise invalid("Missing required param: enabled_events.", param="enabled_events")
        if not isinstance(events, list):
            raise invalid("Invalid array", param="enabled_events")
        ep = acct.add_endpoint(url, events, description=scalar(params, "description"), error=api_error)
        return encode(ep)           # the secret is shown on creation only

    def webhook_endpoint(self, method, params, ep_id):
        acct = self.account
        if method == "GET":
            check_params(params, {"expand"})
            with acct.lock:
                ep = acct.endpoints.get(ep_id)
            if ep is None:
                raise no_such("webhook endpoint", ep_id, "id", 404)
            return encode(public_endpoint(ep))
        if method == "DELETE":
            return encode(acct.delete_endpoint(ep_id, api_error))
        params = self.form_params(params)
        check_params(params, {"url", "enabled_events", "description", "metadata", "disabled", "expand"})
        fields = {}
        if "url" in params:
            fields["url"] = scalar(params, "url")
        if "enabled_events" in params:
            if not isinstance(params["enabled_events"], list):
                raise invalid("Invalid array", param="enabled_events")
            fields["enabled_events"] = params["enabled_events"]
        if "description" in params:
            fields["description"] = scalar(params, "description")
        if "disabled" in params:
            fields["disabled"] = parse_bool(scalar(params, "disabled"), "disabled")
        return encode(public_endpoint(acct.update_endpoint(ep_id, fields, api_error)))

    # -- admin ---------------------------------------------------------------------------

    def handle_admin(self, method, path, query, body):
        try:
            payload = json.loads(body) if body.strip() else {}
        except ValueError:
            self.send(400, encode({"error": "body is not JSON"}))
            return
        params = dict(parse_qsl(query))
        parts = [p for p in path.split("/")[2:] if p]
        try:
            status, result = admin_route(self.account, method, parts, params, payload)
        except AdminError as e:
            status, result = e.status, {"error": str(e)}
        except (ValueError, TypeError, KeyError) as e:
            status, result = 400, {"error": "bad admin request: %r" % (e,)}
        except Exception as e:
            traceback.print_exc()
            status, result = 500, {"error": "fake_stripe bug: %r" % (e,)}
        self.send(status, encode(result))


def public_endpoint(ep):
    """A webhook endpoint as the API shows it after creation: without its secret."""
    return {k: v for k, v in ep.items() if k != "secret"}


def api_error(status, message, param=None):
    if status == 404:
        return StripeError(404, message, code="resource_missing", param=param)
    return invalid(message, param=param, status=status)


def admin_error(status, message, param=None):
    return AdminError(status, message)


def match_route(path):
    for regex, route in ROUTES:
        m = regex.match(path)
        if m:
            return route, m.groups()
    return None, ()


def classify(method, path):
    """Endpoint label (per-endpoint rate limit and stats): method plus path template."""
    route, args = match_route(path)
    if route == "events_list":
        return method + " /v1/events"
    if route == "event_get":
        return method + " /v1/events/{id}"
    if route == "invoice_lines":
        return method + " /v1/invoices/{id}/lines"
    if route == "object_list":
        return "%s /v1/%s" % (method, args[0])
    if route == "object_get":
        return "%s /v1/%s/{id}" % (method, args[0])
    if route == "webhook_endpoints":
        return method + " /v1/webhook_endpoints"
    if route == "webhook_endpoint":
        return method + " /v1/webhook_endpoints/{id}"
    return "other"


def check_permission(key, route, args):
    """Restricted keys read only what they were granted; Stripe answers 403 naming the permission."""
    if not key["restricted"]:
        return
    if route in ("events_list", "event_get"):
        resource, permission = "events", EVENTS_PERMISSION
    elif route in WRITE_ROUTES:
        resource, permission = "webhook_endpoints", "rak_webhook_write"
    else:
        resource = "invoices" if route == "invoice_lines" else args[0]
        permission = KINDS[resource].permission
    if resource not in key["permissions"]:
        raise StripeError(403, "The provided key '%s' does not have the required permissions for this endpoint "
                               "on account '%s'. Having the '%s' permission would allow this request to continue."
                          % (mask_key(key["key"]), ACCOUNT_ID, permission))


# ----------------------------------------------------------------------------
# Admin routes
# ----------------------------------------------------------------------------

def admin_route(acct, method, parts, params, payload):
    """Dispatch /__admin/...; returns (status, JSON-able result)."""
    head = parts[0] if parts else ""
    n = len(parts)
    automatic = params.get("automatic") == "1"
    if (method, head) == ("GET", ""):
        return 200, ADMIN_HELP
    if head == "objects" and n >= 2:
        return admin_objects(acct, method, parts[1], parts[2] if n > 2 else None, params, payload, automatic)
    if (method, head) == ("POST", "bulk") and n == 2:
        count = int(payload.get("count", 0))
        if not 1 <= count <= 100000:
            raise AdminError(400, "count must be 1..100000")
        acct.collection(parts[1])
        return 201, acct.bulk_create(parts[1], count, payload.get("fields") or {}, payload.get("created"))
    if head == "events":
        return admin_events(acct, method, params, payload)
    if (method, head) == ("POST", "expire_events"):
        with acct.lock:
            return 200, {"expired": acct.events.purge_before(int(parse_when(payload["before"])))}
    if (method, head) == ("POST", "clock"):
        return 200, acct.set_clock(payload)
    if head == "keys":
        return admin_keys(acct, method, parts, payload)
    if head == "rate_limit":
        if method == "POST":
            cur = acct.limiter.config()
            acct.limiter.configure(int(payload.get("global", cur["global"])),
                                   int(payload.get("endpoint", cur["endpoint"])),
                                   int(payload.get("concurrency", cur["concurrency"])))
        return 200, acct.limiter.config()
    if head == "faults":
        return admin_faults(acct, method, payload)
    if head == "webhook_endpoints":
        return admin_webhook_endpoints(acct, method, parts, payload)
    if (method, parts) == ("POST", ["webhooks", "send"]):
        return 200, admin_webhook_send(acct, payload)
    shared = webhook_admin(acct.webhooks, method, parts, payload, AdminError)
    if shared is not None:
        return shared
    if head == "requests":
        with acct.lock:
            if method == "DELETE":
                cleared, acct.request_log = len(acct.request_log), []
                return 200, {"cleared": cleared}
            return 200, list(acct.request_log)
    if (method, head) == ("GET", "stats"):
        with acct.lock:
            return 200, {"requests": dict(acct.endpoint_counts), "total_requests": sum(acct.endpoint_counts.values()),
                         "rate_limited": acct.limiter.limited,
                         "objects": {name: len(c.objects) - len(c.deleted) for name, c in acct.collections.items()},
                         "deleted": {name: len(c.deleted) for name, c in acct.collections.items()},
                         "events": len(acct.events.keys)}
    if (method, head) == ("POST", "reset"):
        counts = dict(vars(acct.cfg))
        counts.update({k: v for k, v in payload.items() if k != "seed"})
        acct.reset(int(payload.get("seed", acct.cfg.seed)), counts)
        with acct.lock:
            return 200, {"objects": {name: len(c.objects) for name, c in acct.collections.items()}}
    raise AdminError(404, "no admin endpoint %s /__admin/%s" % (method, "/".join(parts)))


def admin_view(acct, name, obj):
    view = dict(obj)
    if acct.is_deleted(name, obj["id"]):
        view["_deleted"] = True
    return view


def admin_objects(acct, method, name, obj_id, params, payload, automatic):
    coll = acct.collection(name)
    if obj_id is None:
        if method == "POST":
            return 201, acct.create(name, payload, automatic=automatic)
        if method == "GET":
            with acct.lock:
                if params.get("include_deleted") == "1":
                    objs = [coll.objects[k[1]] for k in reversed(coll.keys)]
                else:
                    objs = coll.live()
                return 200, [admin_view(acct, name, o) for o in objs]
    else:
        if method == "GET":
            obj = acct.lookup(name, obj_id)
            if obj is None:
                raise AdminError(404, "no %s %s" % (KINDS[name].obj, obj_id))
            return 200, admin_view(acct, name, obj)
        if method == "PATCH":
            return 200, acct.update(name, obj_id, payload, automatic=automatic)
        if method == "DELETE":
            return 200, acct.delete(name, obj_id, automatic=automatic)
    raise AdminError(405, "objects: GET/POST on /objects/{kind}, GET/PATCH/DELETE on /objects/{kind}/{id}")


def admin_events(acct, method, params, payload):
    with acct.lock:
        acct.expire_old_events()
        if method == "GET":
            pattern = params.get("type", "*")
            return 200, [acct.events.events[k[2]] for k in reversed(acct.events.keys)
                         if fnmatch.fnmatchcase(acct.events.events[k[2]]["type"], pattern)]
        if method == "POST":
            if not isinstance(payload.get("type"), str) or not isinstance(payload.get("object"), dict):
                raise AdminError(400, "give type (string) and object (JSON object)")
            return 201, acct.emit(payload["type"], payload["object"], previous=payload.get("previous_attributes"),
                                  created=payload.get("created"), automatic=bool(payload.get("automatic")))
    raise AdminError(405, "events: GET or POST")


def admin_keys(acct, method, parts, payload):
    with acct.lock:
        if len(parts) == 1 and method == "GET":
            return 200, list(acct.keys.values())
        if len(parts) == 1 and method == "POST":
            return 201, acct.add_key(payload)
        rec = acct.keys.get(parts[1]) if len(parts) >= 2 else None
        if rec is None:
            raise AdminError(404, "no such key")
        if len(parts) == 3 and parts[2] == "expire" and method == "POST":
            rec["state"] = "expired"
            return 200, rec
        if len(parts) == 2 and method == "DELETE":
            del acct.keys[parts[1]]
            return 200, {"revoked": parts[1]}
    raise AdminError(405, "keys: GET/POST /keys, POST /keys/{key}/expire, DELETE /keys/{key}")


def admin_webhook_endpoints(acct, method, parts, payload):
    if len(parts) == 1 and method == "GET":
        with acct.lock:
            return 200, [dict(ep) for ep in acct.endpoints.values()]
    if len(parts) == 1 and method == "POST":
        if not isinstance(payload, dict):
            raise AdminError(400, "body {url, secret?, enabled_events?}")
        unknown = set(payload) - {"url", "secret", "enabled_events", "description", "disabled"}
        if unknown:
            raise AdminError(400, "unknown field(s): %s" % ", ".join(sorted(unknown)))
        return 201, acct.add_endpoint(payload.get("url"), payload.get("enabled_events", ["*"]),
                                      secret=payload.get("secret"), description=payload.get("description"),
                                      disabled=bool(payload.get("disabled")), error=admin_error)
    if len(parts) == 2 and method == "DELETE":
        return 200, acct.delete_endpoint(parts[1], admin_error)
    if len(parts) == 2 and method == "PATCH":
        return 200, acct.update_endpoint(parts[1], payload, admin_error)
    raise AdminError(405, "webhook_endpoints: GET/POST /webhook_endpoints, PATCH/DELETE /webhook_endpoints/{id}")


def admin_webhook_send(acct, payload):
    """One crafted delivery (tampered, stale, replayed...), sent now; returns what the receiver said."""
    if not isinstance(payload, dict):
        raise AdminError(400, "body {url?, endpoint_id?, event_id?, event?, body?, timestamp?, secret?, signature?}")
    with acct.lock:
        ep = None
        if payload.get("endpoint_id") is not None:
            ep = acct.endpoints.get(payload["endpoint_id"])
            if ep is None:
                raise AdminError(404, "no webhook endpoint %s" % payload["endpoint_id"])
        else:
            ep = next((e for e in acct.endpoints.values() if e["status"] == "enabled"), None)
        url = payload.get("url") or (ep or {}).get("url")
        secret = payload.get("secret") or (ep or {}).get("secret")
        if not url:
            raise AdminError(400, "no url given and no webhook endpoint to take it from")
        evt_id = payload.get("event_id")
        if isinstance(payload.get("body"), str):
            body = payload["body"].encode()
        elif isinstance(payload.get("event"), dict):
            body = encode(payload["event"])
        elif evt_id is not None:
            body = acct.events.json.get(evt_id)
            if body is None:
                raise AdminError(404, "no event %s (purged?)" % evt_id)
        elif acct.events.keys:
            evt_id = acct.events.keys[-1][2]
            body = acct.events.json[evt_id]
        else:
            raise AdminError(400, "no body, event or event_id given and no event to send")
    if not secret and payload.get("signature") is None:
        raise AdminError(400, "no secret given and no webhook endpoint to take it from")
    ts = payload.get("timestamp")
    ts = int(time.time()) if ts is None else int(ts)
    headers = webhook_headers(body, secret or "", ts, signature=payload.get("signature"))
    ids = {"event_id": evt_id} if evt_id else {}
    status, text = acct.webhooks.send_now(url, body, headers, ids)
    return {"status": status, "response_body": text, "headers": headers, "body": body.decode("utf-8", "replace")}


def admin_faults(acct, method, payload):
    with acct.lock:
        if method == "GET":
            return 200, acct.faults
        if method == "DELETE":
            cleared, acct.faults = len(acct.faults), []
            return 200, {"cleared": cleared}
        if method != "POST":
            raise AdminError(405, "faults: GET, POST or DELETE")
        fault = make_fault(acct.fault_seq + 1, payload, AdminError)
        acct.fault_seq += 1
        acct.faults.append(fault)
        return 201, {"id": fault["id"]}


# ----------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------

class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


def parse_args(argv):
    p = argparse.ArgumentParser(description="Fake Stripe API for sync's tests")
    p.add_argument("--port", type=int, default=0, help="0 = pick a free port (printed)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--customers", type=int, default=500)
    p.add_argument("--deleted-customers", type=int, default=5, help="extra seeded customers already deleted")
    p.add_argument("--products", type=int, default=20)
    p.add_argument("--prices", type=int, default=40)
    p.add_argument("--subscriptions", type=int, default=200)
    p.add_argument("--invoices", type=int, default=300)
    p.add_argument("--payment-intents", type=int, default=300)
    p.add_argument("--charges", type=int, default=300)
    p.add_argument("--base-time", default="2025-03-01T00:00:00Z",
                   help="seeded created times end 1 h before this ISO time ('now' = startup time)")
    p.add_argument("--api-key", default=DEFAULT_KEY, help="the account's secret key")
    p.add_argument("--api-version", default=DEFAULT_API_VERSION, help="account default API version")
    p.add_argument("--rate-limit", type=int, default=25, help="global requests/s (sandbox: 25; 0 = off)")
    p.add_argument("--endpoint-rate-limit", type=int, default=25, help="requests/s per endpoint (0 = off)")
    p.add_argument("--concurrency-limit", type=int, default=0, help="requests in flight (0 = off)")
    p.add_argument("--verbose", action="store_true", help="log requests to stderr")
    cfg = p.parse_args(argv)
    if not re.match(r"^sk_test_[0-9A-Za-z]+$", cfg.api_key):
        p.error("--api-key must look like sk_test_...")
    cfg.base_time = None if cfg.base_time == "now" else parse_cli_time(p, cfg.base_time)
    return cfg


def parse_cli_time(parser, text):
    try:
        return parse_when(text)
    except AdminError:
        parser.error("--base-time must be ISO-8601 or 'now'")


def main(argv=None):
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    acct = Account(cfg)
    Handler.account = acct
    Handler.verbose = cfg.verbose
    server = Server(("127.0.0.1", cfg.port), Handler)
    print("listening on %d" % server.server_address[1], flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
