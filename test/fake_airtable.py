#!/usr/bin/python3
"""Fake Airtable Web API for the `sync` test suite (Python 3.11, stdlib only).

Run:  /usr/bin/python3 test/fake_airtable.py --port 0 [--bases 1] [--tables 3] [--records 500]
      [--seed 1] [--base-time ISO|now] [--pat TOKEN] [--client-id ..] [--client-secret ..]
      [--refresh-token ..] [--redirect-uri ..] [--access-token-lifetime S]
      [--refresh-token-lifetime S] [--refresh-reuse revoke|reject] [--rotate-access-on-refresh]
      [--offset-ttl S] [--rate-limit N] [--token-rate-limit N] [--penalty S]
      [--penalty-extends] [--monthly-limit N] [--webhook-ttl S] [--payload-retention S]
      [--ms-timestamps] [--verbose]
Prints "listening on PORT" once ready (stdout, flushed). Binds 127.0.0.1 only.

Imitates api.airtable.com (and the OAuth endpoints of airtable.com) as strictly as we know:
personal access tokens and OAuth (PKCE authorize + token endpoint with single-use, rotating
refresh tokens), the meta API (bases, base schema with field ids/types/options), list
records with iterators ("offset") that expire, filterByFormula (a real formula parser),
fields[]/sort/view/maxRecords/returnFieldsByFieldId/cellFormat, empty cells omitted,
webhooks with a pollable payload queue (V2 cell format, destroyedRecordIds), the
5 req/s-per-base and 50 req/s-per-token limits with a 30 s penalty, and Airtable's error
bodies. Every response has a Date header that follows the server clock (shiftable via
/__admin/clock); all expiry (tokens, offsets, penalties, webhooks) uses that clock.

Seeded data (deterministic per --seed, per base): table 1 "Contacts" has every common field
type (formula, lookup, rollup, links, attachments, ...), table 2 "Companies & Partners",
table 3 "Zoë's \"Tasks\" 🚀", further tables are plain. --records N records per table.
Seeded times end 1 h before --base-time (default 2025-03-01T00:00:00Z); the first 150
records of each table (creation order) share one last-modified second, so a
LAST_MODIFIED_TIME() filter at that instant matches more than one page.

Behaviour worth knowing:
  * Times are second-granular (".000Z") unless --ms-timestamps.
  * LAST_MODIFIED_TIME() moves only when a non-computed cell of the record changes; formula,
    lookup, rollup and inverse-link values can change without moving it (as in Airtable).
  * An iterator fixes the matching record ids when the first page is requested; later pages
    read current values and skip records deleted since. Re-sending an offset repeats its page.
  * Deleting a record removes it; nothing about it is left to poll except webhook payloads.
  * filterByFormula names fields ({Field Name} or a bare word), never by id. A syntax error or
    unknown field is 422 INVALID_FILTER_BY_FORMULA; a formula that errors on one record
    (#ERROR!) just leaves that record out.
  * Rate limits: 5 req/s per base and 50 req/s per PAT owner (sliding 1 s window). Going over
    gives 429 to that base/owner for --penalty seconds. Pass --rate-limit 0 --token-rate-limit 0
    to tests that do not exercise limits (a full scan is easily > 50 req/s here).
  * Webhook payloads use cell format V2 (selects {id,name,color}, links [{id,name}], lookups
    {valuesByLinkedRecordId, linkedRecordIds}); a transaction over 100 records is split into
    several payloads sharing one baseTransactionNumber. Changes a write causes in *other*
    records (lookups, rollups, inverse links) produce no payload here.
  * Notification pings (webhooks with a notificationUrl) go out from a background thread, one
    per webhook per 50 ms burst of payloads, MAC'd with X-Airtable-Content-MAC, retried after
    0.2/0.5/1 s on failure (Airtable's own retry schedule is not documented; it is slower);
    POST /__admin/webhooks/hold drops pings (payloads are still recorded: polling them is the
    truth). Every attempt is in GET /__admin/webhook_deliveries.
  * Not implemented: the record write endpoints of /v0 (use /__admin), comments, views other
    than "Grid view", GET /v0/meta/bases paging.

/__admin/ is the test-control API (JSON in/out, no auth, not counted, not logged, never
rate limited); GET /__admin/ lists every endpoint with its shape (ADMIN_HELP below).
"""

import argparse
import base64
import calendar
import email.utils
import gzip
import hashlib
import hmac
import json
import math
import random
import re
import secrets
import socket
import sys
import threading
import time
import traceback
import urllib.request
from collections import deque
from datetime import date, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from fakelib import (FAULT_HELP, WEBHOOK_ADMIN_HELP, Debouncer, FaultDelivery, WebhookSender,
                     fault_on_real_answer, fault_pick, make_fault, webhook_admin)

UTC = timezone.utc
JSON_TYPE = "application/json; charset=utf-8"
MAX_PAGE_SIZE = 100
MAX_URL_CHARS = 16000                  # "only accepts request with a URL shorter than 16,000 characters"
MAX_WEBHOOKS_PER_BASE = 10
MAX_PAYLOADS_PER_REQUEST = 50
RECORDS_PER_PAYLOAD = 100              # big transactions are split over several payloads
AUTH_CODE_LIFETIME = timedelta(minutes=10)
DISABLED_WEBHOOK_GRACE = timedelta(days=7)   # metadata + payloads readable 7 days after expiry
PING_DEBOUNCE = 0.05                   # seconds: one notification ping per burst of payloads
ALL_SCOPES = ["data.records:read", "data.records:write", "schema.bases:read",
              "schema.bases:write", "webhook:manage", "user.email:read"]
BURST = 150                            # seeded records sharing one last-modified second
USER = {"id": "usrFakeAirtable01", "email": "sync-tests@example.com", "name": "Sync Tester",
        "permissionLevel": "create"}

ADMIN_HELP = {
    "GET /__admin/bases": "-> [{id, name, tables: [{id, name, records}]}]",
    "POST /__admin/bases": "body {name?, tables?, records?} -> {id, name, tables} (seeded like the CLI)",
    "GET /__admin/schema/{base}": "-> same body as GET /v0/meta/bases/{base}/tables",
    "POST /__admin/tables/{base}": "body {name, description?, fields?: [{name, type, options?}]} -> table "
                                   "(first field is the primary; default a singleLineText 'Name')",
    "PATCH /__admin/tables/{base}/{table}": "body {name?, description?} -> table",
    "DELETE /__admin/tables/{base}/{table}": "-> {removed: tblId}",
    "POST /__admin/fields/{base}/{table}": "body {name, type, options?} -> field; lookups/rollups/formulas: "
                                           "see add_field() (options use field ids)",
    "PATCH /__admin/fields/{base}/{table}/{field}": "body {name?, description?, type?, options?} -> field",
    "DELETE /__admin/fields/{base}/{table}/{field}": "-> {removed: fldId}",
    "GET /__admin/records/{base}/{table}[?by=name]": "-> [{id, createdTime, lastModifiedTime, fields}] "
                                                     "(truth: API rendering keyed by field id, or by "
                                                     "name with by=name, empty cells omitted; every "
                                                     "records endpoint accepts by=name)",
    "GET /__admin/records/{base}/{table}/{rec}": "-> one record as above",
    "POST /__admin/records/{base}/{table}[?source=client&at=ISO]": "body {fields: {nameOrId: value}} or "
                                                                    "{records: [{fields}]} -> record(s)",
    "PATCH /__admin/records/{base}/{table}/{rec}[?source=..&at=ISO]": "body {fields: {...}}; null/''/[]/false "
                                                                      "empties a cell -> record",
    "DELETE /__admin/records/{base}/{table}/{rec}": "-> {id, deleted: true}",
    "POST /__admin/bulk_create/{base}/{table}[?at=ISO]": "body {count, fields?} -> {ids, createdTime} "
                                                         "(random values unless fields given; one "
                                                         "transaction)",
    "POST /__admin/bulk_update/{base}/{table}[?at=ISO]": "body {ids: [...] | count: N, fields} -> "
                                                         "{ids, lastModifiedTime} (one shared stamp)",
    "POST /__admin/bulk_delete/{base}/{table}": "body {ids: [...] | count: N} -> {ids}",
    "POST /__admin/expire_offsets": "-> {expired: N}",
    "POST /__admin/expire_tokens": "-> {expired: N} (OAuth access tokens)",
    "POST /__admin/oauth/grant": "body {scopes?, refresh_token?} -> {refresh_token, access_token, expires_in, ...}",
    "GET /__admin/oauth": "-> {grants: [{id, revoked, scopes, refresh_tokens: [{token, used, expires}], "
                          "access_tokens}]}",
    "POST /__admin/pats": "body {token?, scopes?, bases?} -> {token, scopes, bases}",
    "DELETE /__admin/pats/{token}": "-> {removed: token}",
    "POST /__admin/rate_limits": "body {per_base?, per_token?, penalty?, penalty_extends?, monthly_limit?, "
                                 "monthly_used?, clear_penalties?} -> current settings",
    "GET /__admin/webhooks": "-> [{id, base, enabled, expirationTime, cursorForNextPayload, payloads, "
                             "notificationUrl, lastNotificationResult, macSecretBase64}] (the delivery "
                             "queue's state is GET /__admin/webhooks/status here)",
    "POST /__admin/webhooks/expire": "body {id? | webhook_id?} -> {expired: [ids]} (expirationTime moved to now: "
                                     "isHookEnabled false, no payloads, no pings; /__admin/clock advance "
                                     "past expirationTime does the same)",
    "POST /__admin/webhooks/purge_payloads": "body {id? | webhook_id?, before?: ISO} -> {purged: N} (payloads are "
                                             "also dropped --payload-retention after they were made; the "
                                             "cursor numbers never restart)",
    "(notification pings)":
        "after a change that gives a webhook with a notificationUrl (and notifications enabled) new payloads, "
        "one ping per webhook per burst (50 ms debounce) is POSTed: body {\"base\":{\"id\":\"app...\"},"
        "\"webhook\":{\"id\":\"ach...\"},\"timestamp\":\"<ISO, fake clock>\"} (compact JSON), headers "
        "Content-Type: application/json, X-Airtable-Content-MAC: hmac-sha256=<hex HMAC-SHA256(key = "
        "base64-decoded macSecretBase64, msg = body)>. Failed pings are retried (/__admin/webhooks/config); "
        "lastNotificationResult {success, error?: {message}, completionTimestamp, durationMs, retryNumber, "
        "willBeRetried?} and lastSuccessfulNotificationTime follow each attempt. Payloads are recorded "
        "whatever happens to pings (hold included). Log ids: webhook_id, base_id",
    "POST /__admin/webhooks/send":
        "body {webhook_id? (default: the newest webhook with a notificationUrl), url?, body?: raw string, "
        "secret_base64?, mac?: whole X-Airtable-Content-MAC value} -> {status, response_body, headers, body}: "
        "one crafted ping sent now (not retried, logged with crafted: true)",
    "POST /__admin/faults": FAULT_HELP,
    "GET /__admin/faults": "-> [fault, ...]",
    "DELETE /__admin/faults": "-> {cleared: N}",
    "GET /__admin/requests": "-> [{t, method, path, query, status}]",
    "DELETE /__admin/requests": "-> {cleared: N}",
    "GET /__admin/stats": "-> {requests: {endpoint: n}, total_requests, rate_limited, offsets, ...}",
    "POST /__admin/clock": "body {offset: seconds} | {now: ISO} | {advance: seconds} -> {now, offset}",
    "POST /__admin/reset": "body {bases?, tables?, records?, seed?} -> {bases: [...]} (webhooks go with the "
                           "bases; also releases a hold and clears the delivery log)",
}
ADMIN_HELP.update({k: v for k, v in WEBHOOK_ADMIN_HELP.items() if k != "GET /__admin/webhooks"})
ADMIN_HELP["GET /__admin/webhooks/status"] = WEBHOOK_ADMIN_HELP["GET /__admin/webhooks"]


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------

class ApiError(Exception):
    """An Airtable API error: HTTP status plus the exact JSON body Airtable sends."""

    def __init__(self, status, body, headers=None):
        super().__init__(str(body))
        self.status = status
        self.body = body
        self.headers = headers or {}


class OAuthError(Exception):
    """OAuth endpoint error: {"error", "error_description"} (RFC 6749 shape)."""

    def __init__(self, status, error, description):
        super().__init__(description)
        self.status = status
        self.body = {"error": error, "error_description": description}


class AdminError(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def api_error(status, etype, message=None):
    err = {"type": etype}
    if message is not None:
        err["message"] = message
    return ApiError(status, {"error": err})


def route_not_found():
    # Undefined routes get the bare string form.
    return ApiError(404, {"error": "NOT_FOUND"})


def model_not_found():
    return api_error(403, "INVALID_PERMISSIONS_OR_MODEL_NOT_FOUND",
                     "Invalid permissions, or the requested model was not found. Check that both your "
                     "user and your token have the required permissions, and that the model names "
                     "and/or ids are correct.")


def invalid_request(message="Invalid request: parameter validation failed. Check your request data."):
    return api_error(422, "INVALID_REQUEST_UNKNOWN", message)


def rate_limited():
    # Observed wire shape (differs from every other error body: "errors" array).
    return ApiError(429, {"errors": [{"error": "RATE_LIMIT_REACHED",
                                      "message": "Rate limit exceeded. Please try again later"}]})


def iterator_gone():
    # Observed wire shape: type only, no message.
    return ApiError(422, {"error": {"type": "LIST_RECORDS_ITERATOR_NOT_AVAILABLE"}})


def bad_formula(detail="Invalid formula. Please check your formula text."):
    return api_error(422, "INVALID_FILTER_BY_FORMULA",
                     "The formula for filtering records is invalid: " + detail)


# ----------------------------------------------------------------------------
# Time helpers (everything is UTC)
# ----------------------------------------------------------------------------

def fmt_ts(dt):
    """Airtable wire form of a timestamp: 2024-05-01T12:34:56.000Z."""
    return "%s.%03dZ" % (dt.strftime("%Y-%m-%dT%H:%M:%S"), dt.microsecond // 1000)


LOOSE_DT_RE = re.compile(r"^\s*(\d{4})-(\d{1,2})-(\d{1,2})(?:[T ](\d{1,2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?)?"
                         r"\s*(Z|[+-]\d{2}:?\d{2})?\s*$")


def parse_dt(text):
    """ISO-ish date/datetime (zone optional, default UTC) -> aware datetime, or None."""
    m = LOOSE_DT_RE.match(text) if isinstance(text, str) else None
    if not m:
        return None
    y, mo, d, h, mi, s, frac, zone = m.groups()
    try:
        dt = datetime(int(y), int(mo), int(d), int(h or 0), int(mi or 0), int(s or 0),
                      int((frac or "0").ljust(6, "0")[:6]), tzinfo=UTC)
    except ValueError:
        return None
    if zone and zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        digits = zone[1:].replace(":", "")
        dt -= sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
    return dt


def admin_dt(text):
    dt = parse_dt(text)
    if dt is None:
        raise AdminError(400, "bad datetime %r (want e.g. 2024-05-01T12:00:00Z)" % (text,))
    return dt


def add_months(dt, n):
    month = dt.month - 1 + n
    year, month = dt.year + month // 12, month % 12 + 1
    return dt.replace(year=year, month=month, day=min(dt.day, calendar.monthrange(year, month)[1]))


# ----------------------------------------------------------------------------
# Ids
# ----------------------------------------------------------------------------

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
BASE_ID_RE = re.compile(r"^app[A-Za-z0-9]{14}$")
REC_ID_RE = re.compile(r"^rec[A-Za-z0-9]{14}$")
OFFSET_RE = re.compile(r"^(itr[A-Za-z0-9]{14})/(rec[A-Za-z0-9]{14})$")


class IdFactory:
    """Deterministic, unique Airtable-style ids: 3-letter prefix + 14 base62 chars."""

    def __init__(self, rng):
        self.rng = rng
        self.used = set()

    def new(self, prefix):
        while True:
            ident = prefix + "".join(self.rng.choice(BASE62) for _ in range(14))
            if ident not in self.used:
                self.used.add(ident)
                return ident


# ----------------------------------------------------------------------------
# Schema model
# ----------------------------------------------------------------------------

TEXT_TYPES = {"singleLineText", "multilineText", "richText", "email", "url", "phoneNumber"}
NUMBER_TYPES = {"number", "currency", "percent", "rating", "duration"}
COMPUTED_TYPES = {"formula", "multipleLookupValues", "rollup", "createdTime", "lastModifiedTime",
                  "autoNumber", "count"}
WRITABLE_TYPES = TEXT_TYPES | NUMBER_TYPES | {"checkbox", "singleSelect", "multipleSelects", "date",
                                              "dateTime", "multipleRecordLinks", "multipleAttachments"}
DATE_FMT = {"name": "iso", "format": "YYYY-MM-DD"}
TIME_FMT = {"name": "24hour", "format": "HH:mm"}
DATETIME_OPTIONS = {"dateFormat": DATE_FMT, "timeFormat": TIME_FMT, "timeZone": "utc"}
SELECT_COLORS = ["blueLight2", "cyanLight2", "tealLight2", "greenLight2", "yellowLight2", "orangeLight2",
                 "redLight2", "pinkLight2", "purpleLight2", "grayLight2"]


class Field:
    """One column: wire metadata (id, name, type, options) plus private evaluation state."""

    def __init__(self, fid, name, ftype, options=None, description=None):
        self.id = fid
        self.name = name
        self.type = ftype
        self.options = options          # wire-form dict, or None when the type has no options
        self.description = description
        self.derived_from = None        # inverse link: (source table id, source field id)
        self.rollup_fn = None           # rollup: aggregate name, e.g. "SUM"
        self.compiled = None            # formula: (schema generation, closure)

    @property
    def computed(self):
        return self.type in COMPUTED_TYPES or self.derived_from is not None

    def meta(self):
        d = {"id": self.id, "name": self.name, "type": self.type}
        if self.description:
            d["description"] = self.description
        if self.options is not None:
            d["options"] = self.options
        return d

    def choice_by_name(self, name):
        for c in (self.options or {}).get("choices", []):
            if c["name"] == name:
                return c
        return None

    def choice_by_id(self, cid):
        for c in (self.options or {}).get("choices", []):
            if c["id"] == cid:
                return c
        return None


class Record:
    __slots__ = ("id", "created", "cells", "mtimes", "modified", "autonumber")

    def __init__(self, rid, created, autonumber):
        self.id = rid
        self.created = created
        self.cells = {}        # field id -> stored value (never an "empty" value)
        self.mtimes = {}       # field id -> last time a user changed that cell
        self.modified = created
        self.autonumber = autonumber


class Table:
    def __init__(self, tid, name, description=None):
        self.id = tid
        self.name = name
        self.description = description
        self.fields = []
        self.views = []
        self.records = {}      # rec id -> Record, in creation order (dicts keep insertion order)
        self.next_autonumber = 1

    @property
    def primary(self):
        return self.fields[0]

    def field(self, key):
        """Field by id or exact name."""
        for f in self.fields:
            if f.id == key:
                return f
        for f in self.fields:
            if f.name == key:
                return f
        return None

    def field_by_name(self, name):
        for f in self.fields:
            if f.name == name:
                return f
        return None

    def meta(self, include_visible=False):
        views = []
        for v in self.views:
            vd = dict(v)
            if include_visible:
                vd["visibleFieldIds"] = [f.id for f in self.fields]
            views.append(vd)
        d = {"id": self.id, "name": self.name, "primaryFieldId": self.primary.id,
             "fields": [f.meta() for f in self.fields], "views": views}
        if self.description:
            d["description"] = self.description
        return d


class Base:
    def __init__(self, bid, name):
        self.id = bid
        self.name = name
        self.tables = []
        self.transaction = 0
        self.webhooks = {}     # id -> Webhook (insertion order)

    def table(self, key):
        """Table by id or exact name (names may contain spaces, quotes, unicode)."""
        for t in self.tables:
            if t.id == key:
                return t
        for t in self.tables:
            if t.name == key:
                return t
        return None


# ----------------------------------------------------------------------------
# Formula language (filterByFormula and formula fields)
# ----------------------------------------------------------------------------

class FormulaSyntaxError(Exception):
    pass


class FormulaUnknownFields(Exception):
    def __init__(self, names):
        super().__init__(", ".join(names))
        self.names = names


class FormulaEvalError(Exception):
    """A cell-level #ERROR!: the record is filtered out / the formula cell shows an error."""


FORMULA_TOKEN_RE = re.compile(r"""
    (?P<ws>\s+)
  | (?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
  | (?P<field>\{(?:[^}\\]|\\.)*\})
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op><=|>=|!=|[=<>&+\-*/(),])
""", re.X | re.S)
STRING_ESCAPES = {"n": "\n", "t": "\t", "r": "\r"}


def unescape(body):
    return re.sub(r"\\(.)", lambda m: STRING_ESCAPES.get(m.group(1), m.group(1)), body, flags=re.S)


def tokenize_formula(text):
    tokens, pos = [], 0
    while pos < len(text):
        m = FORMULA_TOKEN_RE.match(text, pos)
        if not m:
            raise FormulaSyntaxError("unexpected character at %d" % pos)
        pos = m.end()
        kind = m.lastgroup
        if kind == "ws":
            continue
        raw = m.group()
        if kind == "num":
            tokens.append(("lit", float(raw) if any(c in raw for c in ".eE") else int(raw)))
        elif kind == "str":
            tokens.append(("lit", unescape(raw[1:-1])))
        elif kind == "field":
            tokens.append(("field", unescape(raw[1:-1])))
        else:
            tokens.append((kind, raw))
    return tokens


class FormulaParser:
    """Recursive descent: comparison < & < + - < * / < unary < primary."""

    COMPARE = ("=", "!=", "<", ">", "<=", ">=")

    def __init__(self, text):
        self.toks = tokenize_formula(text)
        self.i = 0

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else (None, None)

    def take(self):
        tok = self.peek()
        if tok[0] is None:
            raise FormulaSyntaxError("unexpected end of formula")
        self.i += 1
        return tok

    def is_op(self, *ops):
        kind, val = self.peek()
        return kind == "op" and val in ops

    def parse(self):
        if not self.toks:
            raise FormulaSyntaxError("empty formula")
        node = self.comparison()
        if self.i != len(self.toks):
            raise FormulaSyntaxError("trailing tokens")
        return node

    def binary(self, ops, sub):
        left = sub()
        while self.is_op(*ops):
            op = self.take()[1]
            left = ("bin", op, left, sub())
        return left

    def comparison(self):
        return self.binary(self.COMPARE, self.concat)

    def concat(self):
        return self.binary(("&",), self.additive)

    def additive(self):
        return self.binary(("+", "-"), self.multiplicative)

    def multiplicative(self):
        return self.binary(("*", "/"), self.unary)

    def unary(self):
        if self.is_op("-"):
            self.take()
            return ("neg", self.unary())
        if self.is_op("+"):
            self.take()
            return self.unary()
        return self.primary()

    def primary(self):
        kind, val = self.take()
        if kind in ("lit", "field"):
            return (kind, val)
        if kind == "ident":
            if self.is_op("("):
                self.take()
                args = []
                if not self.is_op(")"):
                    args.append(self.comparison())
                    while self.is_op(","):
                        self.take()
                        args.append(self.comparison())
                if not self.is_op(")"):
                    raise FormulaSyntaxError("missing )")
                self.take()
                return ("call", val.upper(), args)
            return ("bare", val)
        if kind == "op" and val == "(":
            node = self.comparison()
            if not self.is_op(")"):
                raise FormulaSyntaxError("missing )")
            self.take()
            return node
        raise FormulaSyntaxError("unexpected %r" % (val,))


# -- value coercions (None is BLANK()) ---------------------------------------

def f_number(v):
    if v is None:
        return 0
    if isinstance(v, bool):
        return 1 if v else 0
    if isinstance(v, (int, float)):
        return v
    if isinstance(v, str):
        try:
            return float(v.strip()) if v.strip() else 0
        except ValueError:
            raise FormulaEvalError("not a number")
    if isinstance(v, list) and len(v) == 1:
        return f_number(v[0])
    raise FormulaEvalError("not a number")


def num_text(n):
    if isinstance(n, float) and n.is_integer() and abs(n) < 1e15:
        return str(int(n))
    return str(n)


def f_text(v):
    if v is None:
        return ""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, (int, float)):
        return num_text(v)
    if isinstance(v, datetime):
        return fmt_ts(v)
    if isinstance(v, list):
        return ", ".join(f_text(x) for x in v)
    return str(v)


def f_truthy(v):
    if v is None:
        return False
    if isinstance(v, float) and math.isnan(v):
        return False
    if isinstance(v, (list, str)):
        return len(v) > 0
    return bool(v)


def f_datetime(v):
    if v is None or isinstance(v, datetime):
        return v
    if isinstance(v, str):
        dt = parse_dt(v)
        if dt is None:
            raise FormulaEvalError("not a date")
        return dt
    if isinstance(v, list) and len(v) == 1:
        return f_datetime(v[0])
    raise FormulaEvalError("not a date")


def f_compare(op, a, b):
    if isinstance(a, list):
        a = f_text(a)
    if isinstance(b, list):
        b = f_text(b)
    if isinstance(a, datetime) or isinstance(b, datetime):
        try:
            a, b = f_datetime(a), f_datetime(b)
        except FormulaEvalError:
            return op == "!="
        if a is None or b is None:
            return (op == "=") == (a is b) if op in ("=", "!=") else False
    elif isinstance(a, (int, float, bool)) or isinstance(b, (int, float, bool)):
        try:
            a, b = f_number(a), f_number(b)
        except FormulaEvalError:
            a, b = f_text(a), f_text(b)
    else:
        a, b = f_text(a), f_text(b)
    return {"=": a == b, "!=": a != b, "<": a < b, ">": a > b, "<=": a <= b, ">=": a >= b}[op]


def f_arith(op, a, b):
    a, b = f_number(a), f_number(b)
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0:
        raise FormulaEvalError("division by zero")
    return a / b


UNIT_ALIASES = {"ms": "ms", "millisecond": "ms", "milliseconds": "ms", "s": "s", "second": "s",
                "seconds": "s", "m": "m", "minute": "m", "minutes": "m", "h": "h", "hour": "h",
                "hours": "h", "d": "d", "day": "d", "days": "d", "w": "w", "week": "w", "weeks": "w",
                "M": "M", "month": "M", "months": "M", "Q": "Q", "quarter": "Q", "quarters": "Q",
                "y": "y", "year": "y", "years": "y"}
UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def unit_of(v):
    u = UNIT_ALIASES.get(f_text(v)) or UNIT_ALIASES.get(f_text(v).lower())
    if u is None:
        raise FormulaEvalError("bad unit")
    return u


def truncate_dt(dt, unit):
    if unit == "ms":
        return dt.replace(microsecond=dt.microsecond // 1000 * 1000)
    if unit == "s":
        return dt.replace(microsecond=0)
    if unit == "m":
        return dt.replace(second=0, microsecond=0)
    if unit == "h":
        return dt.replace(minute=0, second=0, microsecond=0)
    day = dt.replace(hour=0, minute=0, second=0, microsecond=0)
    if unit == "d":
        return day
    if unit == "w":
        return day - timedelta(days=(day.weekday() + 1) % 7)    # weeks start on Sunday
    if unit == "M":
        return day.replace(day=1)
    if unit == "Q":
        return day.replace(day=1, month=(day.month - 1) // 3 * 3 + 1)
    return day.replace(day=1, month=1)


def fn_dateadd(d, n, unit):
    d, n, u = f_datetime(d), f_number(n), unit_of(unit)
    if d is None:
        return None
    if u in UNIT_SECONDS:
        return d + timedelta(seconds=n * UNIT_SECONDS[u])
    months = int(n) * {"M": 1, "Q": 3, "y": 12}[u]
    return add_months(d, months)


def fn_datetime_diff(a, b, unit="s"):
    a, b, u = f_datetime(a), f_datetime(b), unit_of(unit)
    if a is None or b is None:
        return None
    if u in UNIT_SECONDS:
        return int((a - b).total_seconds() / UNIT_SECONDS[u])
    months = (a.year - b.year) * 12 + a.month - b.month
    if months > 0 and (a.day, a.time()) < (b.day, b.time()):
        months -= 1
    elif months < 0 and (a.day, a.time()) > (b.day, b.time()):
        months += 1
    return int(months / {"M": 1, "Q": 3, "y": 12}[u])


def fn_is_same(a, b, unit="ms"):
    a, b = f_datetime(a), f_datetime(b)
    if a is None or b is None:
        return False
    u = unit_of(unit)
    return truncate_dt(a, u) == truncate_dt(b, u)


def fn_is_after(a, b):
    a, b = f_datetime(a), f_datetime(b)
    return a is not None and b is not None and a > b


def fn_is_before(a, b):
    a, b = f_datetime(a), f_datetime(b)
    return a is not None and b is not None and a < b


DT_FORMAT_RE = re.compile(r"\[[^\]]*\]|YYYY|YY|MM|M|DD|D|HH|H|hh|h|mm|ss|SSS|A|a|X|x|Z")


def fn_datetime_format(d, fmt="YYYY-MM-DDTHH:mm:ss.SSSZ"):
    d = f_datetime(d)
    if d is None:
        return None
    hour12 = d.hour % 12 or 12

    def tok(m):
        t = m.group()
        if t.startswith("["):
            return t[1:-1]
        return {"YYYY": "%04d" % d.year, "YY": "%02d" % (d.year % 100), "MM": "%02d" % d.month,
                "M": str(d.month), "DD": "%02d" % d.day, "D": str(d.day), "HH": "%02d" % d.hour,
                "H": str(d.hour), "hh": "%02d" % hour12, "h": str(hour12), "mm": "%02d" % d.minute,
                "ss": "%02d" % d.second, "SSS": "%03d" % (d.microsecond // 1000),
                "A": "AM" if d.hour < 12 else "PM", "a": "am" if d.hour < 12 else "pm",
                "X": str(int(d.timestamp())), "x": str(int(d.timestamp() * 1000)), "Z": "Z"}[t]
    return DT_FORMAT_RE.sub(tok, f_text(fmt))


def fn_round(x, places=0):
    x, p = f_number(x), int(f_number(places))
    q = 10 ** p
    return math.floor(x * q + 0.5) / q


def fn_find(needle, hay, start=0):
    idx = f_text(hay).find(f_text(needle), max(0, int(f_number(start)) - 1))
    return idx + 1


def fn_search(needle, hay, start=0):
    idx = f_text(hay).lower().find(f_text(needle).lower(), max(0, int(f_number(start)) - 1))
    return None if idx < 0 else idx + 1


def fn_value(v):
    text = re.sub(r"[^0-9.eE+-]", "", f_text(v))
    try:
        return float(text) if text else None
    except ValueError:
        raise FormulaEvalError("VALUE")


def fail(why):
    raise FormulaEvalError(why)


def flat_args(args):
    out = []
    for a in args:
        out.extend(a if isinstance(a, list) else [a])
    return out


def numbers_of(args):
    return [f_number(a) for a in flat_args(args) if a is not None and a != ""]


# name -> (min args, max args or None, implementation taking evaluated values)
FUNCTIONS = {
    "NOT": (1, 1, lambda x: not f_truthy(x)),
    "XOR": (1, None, lambda *a: sum(1 for x in a if f_truthy(x)) % 2 == 1),
    "TRUE": (0, 0, lambda: True),
    "FALSE": (0, 0, lambda: False),
    "BLANK": (0, 0, lambda: None),
    "ERROR": (0, 1, lambda *a: fail("ERROR()")),
    "DATETIME_PARSE": (1, 3, lambda s, *rest: f_datetime(f_text(s)) if f_text(s) else None),
    "IS_AFTER": (2, 2, fn_is_after),
    "IS_BEFORE": (2, 2, fn_is_before),
    "IS_SAME": (2, 3, fn_is_same),
    "DATEADD": (3, 3, fn_dateadd),
    "DATETIME_DIFF": (2, 3, fn_datetime_diff),
    "DATETIME_FORMAT": (1, 2, fn_datetime_format),
    "SET_TIMEZONE": (2, 2, lambda d, tz: f_datetime(d)),
    "LEN": (1, 1, lambda s: len(f_text(s))),
    "LOWER": (1, 1, lambda s: f_text(s).lower()),
    "UPPER": (1, 1, lambda s: f_text(s).upper()),
    "TRIM": (1, 1, lambda s: f_text(s).strip()),
    "CONCATENATE": (1, None, lambda *a: "".join(f_text(x) for x in a)),
    "FIND": (2, 3, fn_find),
    "SEARCH": (2, 3, fn_search),
    "SUBSTITUTE": (3, 4, lambda s, old, new, *i: f_text(s).replace(f_text(old), f_text(new))),
    "LEFT": (2, 2, lambda s, n: f_text(s)[:max(0, int(f_number(n)))]),
    "RIGHT": (2, 2, lambda s, n: f_text(s)[-int(f_number(n)):] if int(f_number(n)) > 0 else ""),
    "MID": (3, 3, lambda s, i, n: f_text(s)[max(0, int(f_number(i)) - 1):][:max(0, int(f_number(n)))]),
    "VALUE": (1, 1, fn_value),
    "T": (1, 1, lambda v: v if isinstance(v, str) else ""),
    "ARRAYJOIN": (1, 2, lambda a, sep=", ": f_text(sep).join(f_text(x) for x in flat_args([a]))),
    "ARRAYCOMPACT": (1, 1, lambda a: [x for x in flat_args([a]) if x not in (None, "")]),
    "ARRAYUNIQUE": (1, 1, lambda a: list(dict.fromkeys(flat_args([a])))),
    "ABS": (1, 1, lambda x: abs(f_number(x))),
    "ROUND": (1, 2, fn_round),
    "INT": (1, 1, lambda x: math.floor(f_number(x))),
    "CEILING": (1, 2, lambda x, *s: math.ceil(f_number(x))),
    "FLOOR": (1, 2, lambda x, *s: math.floor(f_number(x))),
    "MOD": (2, 2, lambda a, b: math.fmod(f_number(a), f_number(b)) if f_number(b) else fail("MOD")),
    "MAX": (1, None, lambda *a: max(numbers_of(a), default=0)),
    "MIN": (1, None, lambda *a: min(numbers_of(a), default=0)),
    "SUM": (1, None, lambda *a: sum(numbers_of(a))),
    "AVERAGE": (1, None, lambda *a: (sum(numbers_of(a)) / len(numbers_of(a))) if numbers_of(a) else 0),
    "COUNT": (1, None, lambda *a: sum(1 for x in flat_args(a) if isinstance(x, (int, float))
                                      and not isinstance(x, bool))),
    "COUNTA": (1, None, lambda *a: sum(1 for x in flat_args(a) if x not in (None, ""))),
}


class FormulaCompiler:
    """Turns a parse tree into a closure fn(ctx). ctx supplies record values (see EvalContext).

    resolve(text) maps the text inside {braces} (or a bare identifier) to a Field or None.
    Unknown references are collected so the error names all of them, like Airtable does.
    """

    def __init__(self, resolve):
        self.resolve = resolve
        self.unknown = []
        self.referenced = []

    def compile(self, node):
        kind = node[0]
        if kind == "lit":
            value = node[1]
            return lambda ctx: value
        if kind == "field":
            return self.field_ref(node[1])
        if kind == "bare":
            upper = node[1].upper()
            if upper in ("TRUE", "FALSE"):
                value = upper == "TRUE"
                return lambda ctx: value
            return self.field_ref(node[1])
        if kind == "neg":
            sub = self.compile(node[1])
            return lambda ctx: -f_number(sub(ctx))
        if kind == "bin":
            return self.binary(node[1], self.compile(node[2]), self.compile(node[3]))
        return self.call(node[1], node[2])

    def field_ref(self, text):
        f = self.resolve(text)
        if f is None:
            self.unknown.append(text)
            return lambda ctx: None
        if f.id not in self.referenced:
            self.referenced.append(f.id)
        return lambda ctx: ctx.value(f)

    @staticmethod
    def binary(op, left, right):
        if op in FormulaParser.COMPARE:
            return lambda ctx: f_compare(op, left(ctx), right(ctx))
        if op == "&":
            return lambda ctx: f_text(left(ctx)) + f_text(right(ctx))
        return lambda ctx: f_arith(op, left(ctx), right(ctx))

    def call(self, name, arg_nodes):
        n = len(arg_nodes)
        if name == "IF":
            if n not in (2, 3):
                raise FormulaSyntaxError("IF arity")
            cond, yes = self.compile(arg_nodes[0]), self.compile(arg_nodes[1])
            no = self.compile(arg_nodes[2]) if n == 3 else (lambda ctx: None)
            return lambda ctx: yes(ctx) if f_truthy(cond(ctx)) else no(ctx)
        if name in ("AND", "OR"):
            if n < 1:
                raise FormulaSyntaxError(name + " arity")
            subs = [self.compile(a) for a in arg_nodes]
            if name == "AND":
                return lambda ctx: all(f_truthy(s(ctx)) for s in subs)
            return lambda ctx: any(f_truthy(s(ctx)) for s in subs)
        if name == "RECORD_ID" and n == 0:
            return lambda ctx: ctx.rec.id
        if name == "CREATED_TIME" and n == 0:
            return lambda ctx: ctx.rec.created
        if name in ("NOW", "TODAY") and n == 0:
            if name == "NOW":
                return lambda ctx: ctx.now()
            return lambda ctx: truncate_dt(ctx.now(), "d")
        if name == "LAST_MODIFIED_TIME":
            fields = []
            for a in arg_nodes:
                if a[0] not in ("field", "bare"):
                    raise FormulaSyntaxError("LAST_MODIFIED_TIME takes field references")
                f = self.resolve(a[1])
                if f is None:
                    self.unknown.append(a[1])
                else:
                    fields.append(f)
            return lambda ctx: ctx.last_modified(fields)
        spec = FUNCTIONS.get(name)
        if spec is None:
            raise FormulaSyntaxError("unknown function " + name)
        lo, hi, impl = spec
        if n < lo or (hi is not None and n > hi):
            raise FormulaSyntaxError("%s arity" % name)
        subs = [self.compile(a) for a in arg_nodes]
        return lambda ctx: impl(*[s(ctx) for s in subs])


def compile_formula(text, resolve):
    """(closure, referenced field ids); raises FormulaSyntaxError / FormulaUnknownFields."""
    tree = FormulaParser(text).parse()
    comp = FormulaCompiler(resolve)
    fn = comp.compile(tree)
    if comp.unknown:
        raise FormulaUnknownFields(comp.unknown)
    return fn, comp.referenced


class EvalContext:
    """What a formula sees of one record."""

    def __init__(self, world, table, rec, depth=0):
        self.world = world
        self.table = table
        self.rec = rec
        self.depth = depth

    def value(self, field):
        return self.world.formula_input(self.table, field, self.rec, self.depth + 1)

    def now(self):
        return self.world.now()

    def last_modified(self, fields):
        if not fields:
            return self.rec.modified
        stamps = [self.rec.mtimes.get(f.id) for f in fields]
        stamps = [s for s in stamps if s is not None]
        return max(stamps) if stamps else self.rec.created


# ----------------------------------------------------------------------------
# Seed vocabulary
# ----------------------------------------------------------------------------

FIRST_NAMES = ["James", "Mary", "José", "Zoë", "Łukasz", "Søren", "Aoife", "Nguyễn", "Ana María",
               "Jean-Luc", "O'Neil", "Chloé", "Ólafur", "Priya", "Wei", "Fatima", "Björn", "Kenji"]
LAST_NAMES = ["Smith", "O'Brien", "Müller", "García", "Åkesson", "Kowalski", "Nakamura", "渡辺",
              "D'Angelo", "van der Berg", "Nuñez", "Said \"Sam\" Ali", "Østergaard", "Lee"]
COMPANY_WORDS = ["Acme", "Globex", "Initech", "Umbrella", "Stark", "Wayne", "Hooli", "Vandelay",
                 "Soylent", "Tyrell", "Müller & Söhne", "O'Reilly", "Ōkami"]
COMPANY_SUFFIX = ["Inc.", "GmbH", "Ltd", "LLC", "S.A.", "Corp.", "& Co", "Group"]
NOTES = ["Prefers email; no calls", "Said \"call me later\"", "It's complicated; see notes",
         "Line one\nLine two", "Unicode: naïve café — 日本語 ✓", "Tab\tseparated", "Emoji 🎉 ok"]
TASKS = ["Write spec", "Call back", "Send \"final\" invoice", "Review PR #42", "Plan Q3 offsite",
         "Fix bug in export", "Zoë's follow-up", "Update CRM"]
STATUSES = ["Lead", "Customer", "Churned", "On \"hold\""]
TAGS = ["VIP", "Newsletter", "Partner", "Überweisung", "🚀 Launch"]
INDUSTRIES = ["Software", "Retail", "Manufacturing", "Finance", "Health care"]
FILE_KINDS = [("report.pdf", "application/pdf", None), ("photo.jpg", "image/jpeg", (1024, 768)),
              ("diagram.png", "image/png", (800, 600)), ("notes.txt", "text/plain", None)]


def maybe(rng, p, value):
    """value with probability p, else None (an empty cell)."""
    return value if rng.random() < p else None


# ----------------------------------------------------------------------------
# The world: all mutable state, guarded by one lock
# ----------------------------------------------------------------------------

class World:
    def __init__(self, cfg):
        self.cfg = cfg
        self.lock = threading.RLock()
        self.clock_offset = 0.0
        self.faults = []
        self.fault_seq = 0
        self.request_log = []
        self.endpoint_counts = {}
        self.rate_limited = 0
        self.rate = {"per_base": cfg.rate_limit, "per_token": cfg.token_rate_limit,
                     "penalty": cfg.penalty, "penalty_extends": cfg.penalty_extends,
                     "monthly_limit": cfg.monthly_limit}
        self.monthly_used = 0
        self.windows = {}             # rate key -> deque of request times (epoch seconds)
        self.penalty_until = {}       # rate key -> epoch seconds
        self.pats = {}
        self.add_pat(cfg.pat, ALL_SCOPES, None)
        self.token_rng = random.Random(secrets.randbits(64))
        self.reset_oauth()
        self.webhook_sender = WebhookSender("fake_airtable")
        self.seed_world(cfg.bases, cfg.tables, cfg.records, cfg.seed)

    # -- clock ---------------------------------------------------------------

    def now(self):
        return datetime.now(UTC) + timedelta(seconds=self.clock_offset)

    def stamp(self):
        """Write timestamp: whole seconds unless --ms-timestamps."""
        now = self.now()
        if self.cfg.ms_timestamps:
            return now.replace(microsecond=now.microsecond // 1000 * 1000)
        return now.replace(microsecond=0)

    # -- seeding -------------------------------------------------------------

    def seed_world(self, n_bases, n_tables, n_records, seed):
        with self.lock:
            self.seed = seed
            self.ids = IdFactory(random.Random(seed * 7919 + 17))
            self.bases = []
            self.iterators = {}
            self.schema_gen = 0
            self.write_gen = 0
            self.reverse_cache = {}
            self.base_time = self.cfg.base_time or self.now().replace(minute=0, second=0, microsecond=0)
            for i in range(n_bases):
                self.seed_base("Sync Test Base %d" % (i + 1) if n_bases > 1 else "Sync Test Base",
                               n_tables, n_records, random.Random(seed * 1000 + i))

    def seed_base(self, name, n_tables, n_records, rng):
        base = Base(self.ids.new("app"), name)
        self.bases.append(base)
        specs = [self.table_spec(k, n_tables) for k in range(n_tables)]
        # Links, lookups and rollups need their target tables, so they are added last.
        deferred = []
        for tname, fields in specs:
            table = self.build_table(base, tname, [f for f in fields if not needs_other_tables(f)])
            deferred += [(table, f) for f in fields if needs_other_tables(f)]
        for table, fspec in deferred:
            self.add_field_to(base, table, fspec)
        # Companies first so Contacts can link to them; then Contacts; then Tasks; then the rest.
        order = [1, 0, 2] + list(range(3, n_tables))
        for k in order:
            if k < n_tables:
                self.seed_records(base, base.tables[k], n_records, rng)
        return base

    def build_table(self, base, name, field_specs):
        table = Table(self.ids.new("tbl"), name)
        base.tables.append(table)
        table.views.append({"id": self.ids.new("viw"), "name": "Grid view", "type": "grid"})
        for fspec in field_specs:
            self.add_field_to(base, table, fspec)
        return table

    def table_spec(self, k, n_tables):
        if k == 0:
            return self.contacts_spec(n_tables)
        if k == 1:
            return self.companies_spec()
        if k == 2:
            return self.tasks_spec()
        return self.plain_spec(k)

    def contacts_spec(self, n_tables):
        fields = [
            {"name": "Name", "type": "singleLineText"},
            {"name": "Notes", "type": "multilineText"},
            {"name": "Email", "type": "email"},
            {"name": "Website", "type": "url"},
            {"name": "Phone", "type": "phoneNumber"},
            {"name": "Score", "type": "number", "options": {"precision": 2}},
            {"name": "Revenue", "type": "currency", "options": {"precision": 2, "symbol": "$"}},
            {"name": "Discount", "type": "percent", "options": {"precision": 1}},
            {"name": "Active", "type": "checkbox"},
            {"name": "Status", "type": "singleSelect", "options": {"choices": [{"name": s} for s in STATUSES]}},
            {"name": "Tags", "type": "multipleSelects", "options": {"choices": [{"name": s} for s in TAGS]}},
            {"name": "Birthday", "type": "date"},
            {"name": "Next Call", "type": "dateTime"},
            {"name": "Rating", "type": "rating"},
            {"name": "Created", "type": "createdTime"},
            {"name": "Modified", "type": "lastModifiedTime"},
            {"name": "Files", "type": "multipleAttachments"},
            {"name": "Score x2", "type": "formula", "formula_names": "{Score} * 2",
             "result": {"type": "number", "options": {"precision": 2}}},
            {"name": "Revenue per Point", "type": "formula", "formula_names": "{Revenue} / {Score}",
             "result": {"type": "number", "options": {"precision": 2}}},
            {"name": "Label", "type": "formula", "formula_names": "UPPER({Name}) & \" <\" & {Email} & \">\"",
             "result": {"type": "singleLineText"}},
            {"name": "ID", "type": "autoNumber"},
        ]
        if n_tables > 1:
            fields += [
                {"name": "Company", "type": "multipleRecordLinks", "link_index": 1},
                {"name": "Company Industry", "type": "multipleLookupValues",
                 "via": "Company", "target": "Industry"},
                {"name": "Company Employees", "type": "rollup", "via": "Company", "target": "Employees",
                 "fn": "SUM"},
            ]
        return "Contacts", fields

    def companies_spec(self):
        return "Companies & Partners", [
            {"name": "Name", "type": "singleLineText"},
            {"name": "Employees", "type": "number", "options": {"precision": 0}},
            {"name": "Industry", "type": "singleSelect", "options": {"choices": [{"name": s} for s in INDUSTRIES]}},
            {"name": "Website", "type": "url"},
            {"name": "Founded", "type": "date"},
        ]

    def tasks_spec(self):
        return "Zoë's \"Tasks\" 🚀", [
            {"name": "Task", "type": "singleLineText"},
            {"name": "Done", "type": "checkbox"},
            {"name": "Due", "type": "dateTime"},
            {"name": "Owner", "type": "multipleRecordLinks", "link_index": 0},
            {"name": "Priority", "type": "rating"},
            {"name": "Details", "type": "richText"},
            {"name": "Estimate", "type": "duration"},
            {"name": "Owner Email", "type": "multipleLookupValues", "via": "Owner", "target": "Email"},
        ]

    def plain_spec(self, k):
        return "Table %d" % (k + 1), [
            {"name": "Name", "type": "singleLineText"},
            {"name": "Value", "type": "number", "options": {"precision": 2}},
            {"name": "Notes", "type": "multilineText"},
        ]

    def add_field_to(self, base, table, spec):
        """Create a field from a seed/admin spec; returns the Field. Raises AdminError."""
        name, ftype = spec.get("name"), spec.get("type")
        if not name or not isinstance(name, str):
            raise AdminError(422, "field name required")
        if table.field_by_name(name):
            raise AdminError(422, "duplicate field name %r" % name)
        if ftype not in WRITABLE_TYPES | COMPUTED_TYPES:
            raise AdminError(422, "unsupported field type %r" % ftype)
        opts = dict(spec.get("options") or {})
        f = Field(self.ids.new("fld"), name, ftype, self.plain_options(ftype, opts), spec.get("description"))
        target = None
        if ftype == "multipleRecordLinks":
            target = self.link_target(base, table, spec, opts)
            f.options = {"linkedTableId": target.id, "isReversed": False, "prefersSingleRecordLink": False}
        elif ftype in ("multipleLookupValues", "rollup", "count"):
            self.configure_linked_computed(table, f, spec, opts)
        elif ftype == "formula":
            text = self.ids_formula(table, opts.get("formula") or spec.get("formula_names", ""))
            f.options = {"formula": text, "isValid": True, "referencedFieldIds": [],
                         "result": spec.get("result") or opts.get("result") or {"type": "singleLineText"}}
            self.check_formula_field(table, f)       # before adding: a bad formula adds nothing
        table.fields.append(f)
        if target is not None and target is not table:
            self.add_inverse_link(table, f, target)
        self.schema_gen += 1
        return f

    def plain_options(self, ftype, opts):
        """Wire options of types that need nothing but their own settings (None: no options)."""
        if ftype in ("number", "percent"):
            return {"precision": int(opts.get("precision", 0))}
        if ftype == "currency":
            return {"precision": int(opts.get("precision", 2)), "symbol": opts.get("symbol", "$")}
        if ftype == "checkbox":
            return {"color": opts.get("color", "greenBright"), "icon": opts.get("icon", "check")}
        if ftype == "rating":
            return {"color": "yellowBright", "icon": "star", "max": int(opts.get("max", 5))}
        if ftype == "duration":
            return {"durationFormat": opts.get("durationFormat", "h:mm")}
        if ftype in ("singleSelect", "multipleSelects"):
            names = [c["name"] if isinstance(c, dict) else str(c) for c in opts.get("choices", [])]
            return {"choices": [{"id": self.ids.new("sel"), "name": n, "color": SELECT_COLORS[i % len(SELECT_COLORS)]}
                                for i, n in enumerate(names)]}
        if ftype == "date":
            return {"dateFormat": dict(DATE_FMT)}
        if ftype == "dateTime":
            return json.loads(json.dumps(DATETIME_OPTIONS))
        if ftype == "createdTime":
            return {"result": {"type": "dateTime", "options": json.loads(json.dumps(DATETIME_OPTIONS))}}
        if ftype == "lastModifiedTime":
            return {"isValid": True, "referencedFieldIds": None,
                    "result": {"type": "dateTime", "options": json.loads(json.dumps(DATETIME_OPTIONS))}}
        if ftype == "multipleAttachments":
            return {"isReversed": False}
        return None

    def link_target(self, base, table, spec, opts):
        if "link_index" in spec:
            idx = spec["link_index"]
            return base.tables[idx] if idx < len(base.tables) else table
        target = base.table(opts.get("linkedTableId", ""))
        if target is None:
            raise AdminError(422, "options.linkedTableId must name a table of this base")
        return target

    def configure_linked_computed(self, table, f, spec, opts):
        via = table.field(spec.get("via") or opts.get("recordLinkFieldId", ""))
        if via is None or via.type != "multipleRecordLinks":
            raise AdminError(422, "options.recordLinkFieldId must be a link field of this table")
        if f.type == "count":
            f.options = {"isValid": True, "recordLinkFieldId": via.id}
            return
        linked = self.table_by_id(via.options["linkedTableId"])
        target = linked.field(spec.get("target") or opts.get("fieldIdInLinkedTable", "")) if linked else None
        if target is None:
            raise AdminError(422, "options.fieldIdInLinkedTable must be a field of the linked table")
        if f.type == "multipleLookupValues":
            result = {k: v for k, v in target.meta().items() if k in ("type", "options")}
            f.options = {"isValid": True, "recordLinkFieldId": via.id, "fieldIdInLinkedTable": target.id,
                         "result": result}
        else:
            f.rollup_fn = (spec.get("fn") or opts.get("fn") or "SUM").upper()
            if f.rollup_fn not in ("SUM", "MAX", "MIN", "AVERAGE", "COUNT", "COUNTA"):
                raise AdminError(422, "rollup fn must be SUM, MAX, MIN, AVERAGE, COUNT or COUNTA")
            f.options = {"isValid": True, "recordLinkFieldId": via.id, "fieldIdInLinkedTable": target.id,
                         "referencedFieldIds": [], "result": {"type": "number", "options": {"precision": 0}}}

    def ids_formula(self, table, text):
        """Formulas are written with names; the API shows them with field ids."""
        def sub(m):
            f = table.field_by_name(unescape(m.group(0)[1:-1]))
            return "{%s}" % f.id if f else m.group(0)
        return re.sub(r"\{(?:[^}\\]|\\.)*\}", sub, text)

    def check_formula_field(self, table, f):
        try:
            fn, refs = compile_formula(f.options["formula"], table.field)
            f.options["isValid"], f.options["referencedFieldIds"] = True, refs
            f.compiled = (self.schema_gen + 1, fn)      # add_field_to bumps schema_gen next
        except (FormulaSyntaxError, FormulaUnknownFields):
            raise AdminError(422, "invalid formula %r" % f.options["formula"])

    def add_inverse_link(self, table, f, target):
        """Airtable always creates the other side of a link; here it is derived, read-only."""
        name = table.name
        while target.field_by_name(name):
            name += " 2"
        inv = Field(self.ids.new("fld"), name, "multipleRecordLinks",
                    {"linkedTableId": table.id, "isReversed": False, "prefersSingleRecordLink": False,
                     "inverseLinkFieldId": f.id})
        inv.derived_from = (table.id, f.id)
        target.fields.append(inv)
        f.options["inverseLinkFieldId"] = inv.id

    def seed_records(self, base, table, count, rng):
        end = self.base_time - timedelta(hours=1)
        start = self.base_time - timedelta(days=90)
        span = (end - timedelta(days=2) - start).total_seconds()
        created = sorted(start + timedelta(seconds=int(rng.random() * span)) for _ in range(count))
        burst = self.base_time - timedelta(days=1)
        for i, c in enumerate(created):
            rec = Record(self.ids.new("rec"), c, table.next_autonumber)
            table.next_autonumber += 1
            modified = burst if i < BURST else c + timedelta(seconds=int(rng.random() * (end - c).total_seconds()))
            for f in table.fields:
                if f.computed:
                    continue
                value = self.random_value(base, table, f, rng, i)
                if not is_empty_stored(value):
                    rec.cells[f.id] = value
                    rec.mtimes[f.id] = c if f is table.primary else modified
            rec.modified = modified
            table.records[rec.id] = rec

    def random_value(self, base, table, f, rng, i):
        """A plausible stored value for a seeded cell (None = empty)."""
        t = f.type
        if f is table.primary:
            if table.name.startswith("Companies"):
                return "%s %s" % (rng.choice(COMPANY_WORDS), rng.choice(COMPANY_SUFFIX))
            if t == "singleLineText" and table.name.startswith("Zo"):
                return "%s %d" % (rng.choice(TASKS), i + 1)
            if table.name == "Contacts":
                return "%s %s" % (rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES))
            return "Row %d" % (i + 1)
        if t in ("multilineText", "richText"):
            return maybe(rng, 0.6, rng.choice(NOTES))
        if t == "singleLineText":
            return maybe(rng, 0.7, rng.choice(TASKS))
        if t == "email":
            return maybe(rng, 0.8, "user%d@example.com" % (i + 1))
        if t == "url":
            return maybe(rng, 0.5, "https://example.com/%d?q=a&b=%%C3%%A9" % (i + 1))
        if t == "phoneNumber":
            return maybe(rng, 0.5, "(415) 555-%04d" % rng.randrange(10000))
        if t == "number":
            if f.options["precision"] == 0:
                return maybe(rng, 0.9, rng.randrange(1, 5000))
            return maybe(rng, 0.8, round(rng.uniform(-50, 1000), f.options["precision"]))
        if t == "currency":
            return maybe(rng, 0.7, round(rng.uniform(0, 100000), 2))
        if t == "percent":
            return maybe(rng, 0.6, round(rng.random(), 3))
        if t == "checkbox":
            return maybe(rng, 0.5, True)
        if t == "rating":
            return maybe(rng, 0.6, rng.randrange(1, f.options["max"] + 1))
        if t == "duration":
            return maybe(rng, 0.6, rng.randrange(60, 36000))
        if t == "singleSelect":
            return maybe(rng, 0.85, rng.choice(f.options["choices"])["id"])
        if t == "multipleSelects":
            n = rng.randrange(0, 4)
            return [c["id"] for c in rng.sample(f.options["choices"], n)] or None
        if t == "date":
            return maybe(rng, 0.6, date(rng.randrange(1950, 2005), rng.randrange(1, 13),
                                        rng.randrange(1, 29)).isoformat())
        if t == "dateTime":
            return maybe(rng, 0.6, self.base_time + timedelta(minutes=15 * rng.randrange(-4000, 4000)))
        if t == "multipleRecordLinks":
            linked = self.table_by_id(f.options["linkedTableId"])
            if not linked or not linked.records or rng.random() < 0.2:
                return None
            ids = list(linked.records)
            return [rng.choice(ids) for _ in range(rng.choice([1, 1, 1, 2]))]
        if t == "multipleAttachments":
            if rng.random() < 0.7:
                return None
            return [self.new_attachment(rng, *rng.choice(FILE_KINDS)) for _ in range(rng.randrange(1, 3))]
        return None

    def new_attachment(self, rng, filename, mime, dims):
        att = {"id": self.ids.new("att"), "filename": filename, "type": mime,
               "size": rng.randrange(1000, 5000000), "key": "%032x" % rng.getrandbits(128)}
        if dims:
            att["width"], att["height"] = dims
        return att

    def table_by_id(self, tid):
        for b in self.bases:
            for t in b.tables:
                if t.id == tid:
                    return t
        return None

    def base(self, bid):
        for b in self.bases:
            if b.id == bid:
                return b
        return None

    # -- cell values -------------------------------------------------------

    def linked_ids(self, table, f, rec):
        """Ids in a link cell that still exist (deleted records vanish from links)."""
        if f.derived_from:
            return self.reverse_links(f.derived_from[0], f.derived_from[1]).get(rec.id, [])
        linked = self.table_by_id(f.options["linkedTableId"])
        if linked is None:
            return []
        return [r for r in rec.cells.get(f.id, []) if r in linked.records]

    def reverse_links(self, src_table_id, src_field_id):
        """target rec id -> [source rec ids], rebuilt after writes (inverse link fields)."""
        cached = self.reverse_cache.get(src_field_id)
        if cached and cached[0] == self.write_gen:
            return cached[1]
        index = {}
        src = self.table_by_id(src_table_id)
        for r in (src.records.values() if src else ()):
            for target in r.cells.get(src_field_id, []):
                lst = index.setdefault(target, [])
                if r.id not in lst:
                    lst.append(r.id)
        self.reverse_cache[src_field_id] = (self.write_gen, index)
        return index

    def link_field_of(self, table, fid):
        f = table.field(fid)
        return f if f is not None and f.type == "multipleRecordLinks" else None

    def looked_up(self, table, f, rec):
        """[(linked rec id, V1 value)] for a lookup/rollup field; None when invalid."""
        via = self.link_field_of(table, f.options.get("recordLinkFieldId"))
        linked = self.table_by_id(via.options["linkedTableId"]) if via else None
        target = linked.field(f.options.get("fieldIdInLinkedTable")) if linked else None
        if target is None:
            f.options["isValid"] = False
            return None
        out = []
        for rid in self.linked_ids(table, via, rec):
            out.append((rid, self.cell_v1(linked, target, linked.records[rid])))
        return out

    def formula_result(self, table, f, rec, depth=0):
        """Raw formula value; raises FormulaEvalError for #ERROR!."""
        if depth > 20:
            raise FormulaEvalError("circular reference")
        if f.compiled is None or f.compiled[0] != self.schema_gen:
            try:
                fn, refs = compile_formula(f.options["formula"], table.field)
                f.options["isValid"], f.options["referencedFieldIds"] = True, refs
            except (FormulaSyntaxError, FormulaUnknownFields):
                f.options["isValid"] = False
                fn = None
            f.compiled = (self.schema_gen, fn)
        if f.compiled[1] is None:
            raise FormulaEvalError("invalid formula")
        return f.compiled[1](EvalContext(self, table, rec, depth))

    def rollup_value(self, table, f, rec):
        vals = self.looked_up(table, f, rec)
        if not vals:
            return None
        flat = flat_args([v for _, v in vals])
        nums = [x for x in flat if isinstance(x, (int, float)) and not isinstance(x, bool)]
        fn = f.rollup_fn or "SUM"
        if fn == "COUNT":
            return len(nums)
        if fn == "COUNTA":
            return len([x for x in flat if x not in (None, "")])
        if not nums:
            return None
        return {"SUM": sum(nums), "MAX": max(nums), "MIN": min(nums),
                "AVERAGE": sum(nums) / len(nums)}[fn]

    def formula_input(self, table, f, rec, depth=0):
        """A field's value as formulas see it (None is blank)."""
        t = f.type
        if t == "formula":
            return self.formula_result(table, f, rec, depth)
        if t == "createdTime":
            return rec.created
        if t == "lastModifiedTime":
            return rec.modified
        if t == "autoNumber":
            return rec.autonumber
        if t == "multipleRecordLinks":
            linked = self.table_by_id(f.options["linkedTableId"])
            ids = self.linked_ids(table, f, rec)
            return [self.primary_text(linked, linked.records[r]) for r in ids] or None
        if t == "multipleLookupValues":
            vals = self.looked_up(table, f, rec)
            return flat_args([v for _, v in vals]) or None if vals else None
        if t == "rollup":
            return self.rollup_value(table, f, rec)
        if t == "count":
            via = self.link_field_of(table, f.options.get("recordLinkFieldId"))
            return len(self.linked_ids(table, via, rec)) if via else None
        v = rec.cells.get(f.id)
        if v is None:
            return None
        if t == "singleSelect":
            c = f.choice_by_id(v)
            return c["name"] if c else None
        if t == "multipleSelects":
            return [f.choice_by_id(c)["name"] for c in v if f.choice_by_id(c)] or None
        if t == "date":
            return parse_dt(v)
        if t == "multipleAttachments":
            return ["%s (%s)" % (a["filename"], self.attachment_url(a)) for a in v]
        return v

    def primary_text(self, table, rec):
        return f_text(self.formula_input(table, table.primary, rec))

    def attachment_url(self, att, variant=""):
        """URLs expire ~2 h after being served, so they change every hour: never data changes."""
        exp = (int(self.now().timestamp()) // 3600 + 2) * 3600
        sig = hashlib.sha256(("%s/%s/%d" % (att["key"], variant, exp)).encode()).hexdigest()[:22]
        return "https://v5.airtableusercontent.com/v3/u/%d/%s/%s/%s" % (
            exp, sig, att["key"][:16] + variant, quote(att["filename"]))

    def attachment_v1(self, att):
        d = {"id": att["id"], "width": att.get("width"), "height": att.get("height"),
             "url": self.attachment_url(att), "filename": att["filename"], "size": att["size"],
             "type": att["type"]}
        if "width" not in att:
            del d["width"], d["height"]
        else:
            w, h = att["width"], att["height"]
            d["thumbnails"] = {
                "small": {"url": self.attachment_url(att, "s"), "width": max(1, w * 36 // h), "height": 36},
                "large": {"url": self.attachment_url(att, "l"), "width": min(w, 512),
                          "height": h * min(w, 512) // w},
                "full": {"url": self.attachment_url(att, "f"), "width": 3000, "height": 3000}}
        return d

    def cell_v1(self, table, f, rec):
        """The list-records (cell format V1) JSON value; None/''/[]/False mean 'omit'."""
        t = f.type
        if t == "formula":
            try:
                v = self.formula_result(table, f, rec)
            except FormulaEvalError:
                return {"error": "#ERROR!"}
            if isinstance(v, datetime):
                return fmt_ts(v)
            if isinstance(v, float):
                return json_number(v)
            if isinstance(v, list):
                return [f_text(x) if isinstance(x, datetime) else x for x in v]
            return v
        if t in ("createdTime", "lastModifiedTime"):
            return fmt_ts(self.formula_input(table, f, rec))
        if t == "autoNumber":
            return rec.autonumber
        if t == "multipleRecordLinks":
            return self.linked_ids(table, f, rec)
        if t == "multipleLookupValues":
            vals = self.looked_up(table, f, rec)
            return flat_args([v for _, v in vals if not is_empty_wire(v)]) if vals else None
        if t in ("rollup", "count"):
            v = self.formula_input(table, f, rec)
            return json_number(v) if isinstance(v, float) else v
        v = rec.cells.get(f.id)
        if v is None:
            return None
        if t == "singleSelect":
            c = f.choice_by_id(v)
            return c["name"] if c else None
        if t == "multipleSelects":
            return [f.choice_by_id(c)["name"] for c in v if f.choice_by_id(c)]
        if t == "dateTime":
            return fmt_ts(v)
        if t == "multipleAttachments":
            return [self.attachment_v1(a) for a in v]
        if isinstance(v, float):
            return json_number(v)
        return v

    def cell_v2(self, table, f, rec):
        """Webhook payload (cell format V2) value; differs from V1 for selects, links, lookups."""
        t = f.type
        if t == "singleSelect":
            c = f.choice_by_id(rec.cells.get(f.id))
            return dict(c) if c else None
        if t == "multipleSelects":
            return [dict(f.choice_by_id(c)) for c in rec.cells.get(f.id, []) if f.choice_by_id(c)]
        if t == "multipleRecordLinks":
            linked = self.table_by_id(f.options["linkedTableId"])
            return [{"id": r, "name": self.primary_text(linked, linked.records[r])}
                    for r in self.linked_ids(table, f, rec)]
        if t == "multipleLookupValues":
            vals = self.looked_up(table, f, rec)
            if not vals:
                return None
            by_rec = {}
            for rid, v in vals:
                by_rec.setdefault(rid, []).extend(v if isinstance(v, list) else ([] if v is None else [v]))
            return {"valuesByLinkedRecordId": by_rec, "linkedRecordIds": [rid for rid, _ in vals]}
        return self.cell_v1(table, f, rec)

    def cell_string(self, table, f, rec, tz):
        """cellFormat=string rendering (approximate, like the UI; documented as unstable)."""
        t = f.type
        v = self.cell_v1(table, f, rec)
        if is_empty_wire(v):
            return None
        if t == "checkbox":
            return "checked"
        if t in ("number", "currency", "percent"):
            p = f.options.get("precision", 0)
            if t == "percent":
                return "{:.{p}f}%".format(v * 100, p=p)
            text = "{:,.{p}f}".format(v, p=p)
            return f.options["symbol"] + text if t == "currency" else text
        if t in ("dateTime", "createdTime", "lastModifiedTime"):
            return parse_dt(v).astimezone(tz).strftime("%Y-%m-%d %H:%M")
        if t == "multipleRecordLinks":
            linked = self.table_by_id(f.options["linkedTableId"])
            return ", ".join(self.primary_text(linked, linked.records[r]) for r in v)
        if t == "multipleAttachments":
            return ", ".join("%s (%s)" % (a["filename"], a["url"]) for a in v)
        if isinstance(v, dict):
            return "#ERROR!"
        return f_text(v)

    def render_record(self, table, rec, fields, by_id, cell_format="json", tz=UTC, comment_count=False):
        out = {}
        for f in fields:
            if cell_format == "string":
                v = self.cell_string(table, f, rec, tz)
            else:
                v = self.cell_v1(table, f, rec)
            if not is_empty_wire(v):
                out[f.id if by_id else f.name] = v
        d = {"id": rec.id, "createdTime": fmt_ts(rec.created), "fields": out}
        if comment_count:
            d["commentCount"] = 0
        return d

    def cells_v2(self, table, rec):
        """Every non-empty cell of a record in V2 format, keyed by field id."""
        out = {}
        for f in table.fields:
            v = self.cell_v2(table, f, rec)
            if not is_empty_wire(v):
                out[f.id] = v
        return out

    # -- writes (admin) ------------------------------------------------------

    def coerce(self, base, table, values):
        """Admin input {nameOrId: value} -> {field id: stored value or None}. Raises AdminError."""
        if not isinstance(values, dict):
            raise AdminError(400, "fields must be an object")
        out = {}
        for key, value in values.items():
            f = table.field(key)
            if f is None:
                raise AdminError(422, 'Unknown field name: "%s"' % key)
            if f.computed:
                raise AdminError(422, "field %r is computed and cannot be written" % f.name)
            out[f.id] = self.coerce_value(f, value)
        return out

    def coerce_value(self, f, value):
        t = f.type
        if is_empty_wire(value):
            return None
        try:
            if t in TEXT_TYPES:
                return str(value)
            if t in ("rating", "duration"):
                return int(value)
            if t in NUMBER_TYPES:
                n = float(value)
                return int(n) if n.is_integer() and not isinstance(value, float) else n
            if t == "checkbox":
                return True if value else None
            if t == "singleSelect":
                return self.choice_id(f, str(value))
            if t == "multipleSelects":
                return [self.choice_id(f, str(v)) for v in value] or None
            if t == "date":
                d = parse_dt(str(value))
                if d is None:
                    raise ValueError(value)
                return d.date().isoformat()
            if t == "dateTime":
                d = parse_dt(str(value))
                if d is None:
                    raise ValueError(value)
                return d
            if t == "multipleRecordLinks":
                linked = self.table_by_id(f.options["linkedTableId"])
                ids = [str(v) for v in value]
                missing = [r for r in ids if r not in linked.records]
                if missing:
                    raise AdminError(422, "no record %s in linked table" % missing[0])
                return ids or None
            if t == "multipleAttachments":
                rng = random.Random(self.write_gen * 31 + len(value))
                out = []
                for a in value:
                    a = a if isinstance(a, dict) else {"filename": str(a)}
                    att = self.new_attachment(rng, a.get("filename", "file.bin"),
                                              a.get("type", "application/octet-stream"), None)
                    if a.get("width") and a.get("height"):
                        att["width"], att["height"] = int(a["width"]), int(a["height"])
                    if a.get("size"):
                        att["size"] = int(a["size"])
                    out.append(att)
                return out or None
        except (TypeError, ValueError):
            raise AdminError(422, "bad value %r for %s field %r" % (value, t, f.name))
        raise AdminError(422, "cannot write %s fields" % t)

    def choice_id(self, f, name):
        c = f.choice_by_name(name)
        if c is None:      # admin writes typecast: unknown options are created
            c = {"id": self.ids.new("sel"), "name": name,
                 "color": SELECT_COLORS[len(f.options["choices"]) % len(SELECT_COLORS)]}
            f.options["choices"].append(c)
        return c["id"]

    def create_record(self, base, table, values, tx, at=None, created=None):
        stamp = at or self.stamp()
        rec = Record(self.ids.new("rec"), created or stamp, table.next_autonumber)
        table.next_autonumber += 1
        for fid, v in self.coerce(base, table, values).items():
            if v is not None:
                rec.cells[fid] = v
                rec.mtimes[fid] = stamp
        rec.modified = stamp
        table.records[rec.id] = rec
        self.write_gen += 1
        tx.created(table, rec)
        return rec

    def update_record(self, base, table, rec, values, tx, at=None):
        coerced = self.coerce(base, table, values)
        changed = {fid: v for fid, v in coerced.items() if rec.cells.get(fid) != v}
        if not changed:
            return rec
        before = self.cells_v2(table, rec) if tx.tracking else {}
        stamp = at or self.stamp()
        for fid, v in changed.items():
            if v is None:
                rec.cells.pop(fid, None)
            else:
                rec.cells[fid] = v
            rec.mtimes[fid] = stamp
        rec.modified = max(rec.modified, stamp)
        self.write_gen += 1
        tx.changed(table, rec, before)
        return rec

    def delete_record(self, table, rec_id, tx):
        if rec_id not in table.records:
            raise AdminError(404, "no record %s in table %s" % (rec_id, table.name))
        del table.records[rec_id]
        self.write_gen += 1
        tx.destroyed(table, rec_id)

    def record_view(self, table, rec, by_id=True):
        d = self.render_record(table, rec, table.fields, by_id)
        d["lastModifiedTime"] = fmt_ts(rec.modified)
        return d

    # -- schema writes (admin) -------------------------------------------------

    def remove_field(self, base, table, f, tx):
        if f is table.primary:
            raise AdminError(422, "the primary field cannot be deleted")
        if f.derived_from:
            raise AdminError(422, "delete the link field %s instead" % f.derived_from[1])
        doomed = [f]
        if f.type == "multipleRecordLinks" and f.options.get("inverseLinkFieldId"):
            linked = self.table_by_id(f.options["linkedTableId"])
            inv = linked.field(f.options["inverseLinkFieldId"]) if linked else None
            if inv:
                doomed.append(inv)
        for d in doomed:
            owner = table if d in table.fields else self.table_by_id(f.options["linkedTableId"])
            owner.fields.remove(d)
            for r in owner.records.values():
                r.cells.pop(d.id, None)
                r.mtimes.pop(d.id, None)
            tx.field_destroyed(owner, d)
        self.schema_gen += 1
        self.write_gen += 1

    def remove_table(self, base, table, tx):
        if len(base.tables) == 1:
            raise AdminError(422, "a base needs at least one table")
        # Links into the doomed table go with it (their inverse sides live in that table).
        for other in base.tables:
            if other is table:
                continue
            for f in list(other.fields):
                if f.type == "multipleRecordLinks" and f.options.get("linkedTableId") == table.id:
                    other.fields.remove(f)
                    for r in other.records.values():
                        r.cells.pop(f.id, None)
                    tx.field_destroyed(other, f)
        base.tables.remove(table)
        self.schema_gen += 1
        self.write_gen += 1
        tx.table_destroyed(table)

    # -- auth ----------------------------------------------------------------

    def add_pat(self, token, scopes, bases):
        self.pats[token] = {"scopes": list(scopes), "bases": bases, "user": USER["id"]}

    def reset_oauth(self):
        self.grants = {}
        self.refresh_tokens = {}
        self.access_tokens = {}
        self.auth_codes = {}
        self.new_grant(ALL_SCOPES, self.cfg.refresh_token)

    def new_token(self, prefix):
        return prefix + "".join(self.token_rng.choice(BASE62) for _ in range(40))

    def new_grant(self, scopes, refresh_token=None):
        gid = "oag%d" % (len(self.grants) + 1)
        self.grants[gid] = {"id": gid, "scopes": list(scopes), "revoked": False}
        return self.issue_tokens(gid, refresh_token)

    def issue_tokens(self, gid, refresh_token=None):
        now = self.now()
        access = self.new_token("oaa")
        refresh = refresh_token or self.new_token("oar")
        grant = self.grants[gid]
        self.access_tokens[access] = {"grant": gid, "expires": now + timedelta(seconds=self.cfg.access_token_lifetime)}
        self.refresh_tokens[refresh] = {"grant": gid, "used": False,
                                        "expires": now + timedelta(seconds=self.cfg.refresh_token_lifetime)}
        return {"access_token": access, "refresh_token": refresh, "token_type": "Bearer",
                "scope": " ".join(grant["scopes"]), "expires_in": int(self.cfg.access_token_lifetime),
                "refresh_expires_in": int(self.cfg.refresh_token_lifetime)}

    def revoke_grant(self, gid):
        self.grants[gid]["revoked"] = True
        for tok in [t for t, a in self.access_tokens.items() if a["grant"] == gid]:
            del self.access_tokens[tok]

    def principal(self, token):
        """{kind, scopes, bases, user, key} for a valid bearer token, else None."""
        pat = self.pats.get(token)
        if pat:
            return {"kind": "pat", "scopes": pat["scopes"], "bases": pat["bases"], "user": pat["user"],
                    "key": "user:" + pat["user"]}
        acc = self.access_tokens.get(token)
        if acc and acc["expires"] > self.now() and not self.grants[acc["grant"]]["revoked"]:
            return {"kind": "oauth", "scopes": self.grants[acc["grant"]]["scopes"], "bases": None,
                    "user": USER["id"], "key": None}
        return None

    # -- rate limits -----------------------------------------------------------

    def admit(self, key, limit):
        """Sliding 1-second window; over the limit starts a penalty. True when admitted."""
        if not limit:
            return True
        now = self.now().timestamp()
        until = self.penalty_until.get(key, 0)
        if now < until:
            if self.rate["penalty_extends"]:
                self.penalty_until[key] = now + self.rate["penalty"]
            return False
        window = self.windows.setdefault(key, deque())
        while window and window[0] <= now - 1.0:
            window.popleft()
        if len(window) >= limit:
            self.penalty_until[key] = now + self.rate["penalty"]
            window.clear()
            return False
        window.append(now)
        return True

    def in_penalty(self, key):
        return key is not None and self.now().timestamp() < self.penalty_until.get(key, 0)

    # -- faults / log ----------------------------------------------------------

    def take_fault(self, target):
        with self.lock:
            return fault_pick(self.faults, target)

    def log_request(self, entry, endpoint):
        with self.lock:
            self.request_log.append(entry)
            if len(self.request_log) > 100000:
                del self.request_log[:50000]
            self.endpoint_counts[endpoint] = self.endpoint_counts.get(endpoint, 0) + 1


def needs_other_tables(spec):
    return "link_index" in spec or "via" in spec


def json_number(v):
    """JSON numbers as JavaScript prints them: 5 not 5.0."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return int(v)
    return v


def is_empty_wire(v):
    return v is None or v is False or v == "" or v == [] or v == {}


def is_empty_stored(v):
    return v is None or v is False or v == "" or v == []


# ----------------------------------------------------------------------------
# Transactions -> webhook payloads
# ----------------------------------------------------------------------------

class Transaction:
    """Collects the changes of one admin action; commit() turns them into webhook payloads."""

    def __init__(self, world, base, source="client"):
        self.world = world
        self.base = base
        self.source = source
        # Record diffs cost two renders; skip them when no webhook could receive a payload.
        self.tracking = any(h.enabled(world.now()) for h in base.webhooks.values())
        self.tables = {}           # table id -> change dict
        self.created_tables = {}
        self.destroyed_tables = []

    def t(self, table):
        return self.tables.setdefault(table.id, {"created": {}, "changed": {}, "destroyed": [],
                                                 "fields_created": {}, "fields_changed": {},
                                                 "fields_destroyed": [], "metadata": None})

    def created(self, table, rec):
        self.t(table)["created"][rec.id] = rec

    def changed(self, table, rec, before):
        ch = self.t(table)["changed"]
        if rec.id in self.t(table)["created"]:
            return
        if rec.id in ch:
            before = ch[rec.id][1]
        ch[rec.id] = (rec, before)

    def destroyed(self, table, rec_id):
        t = self.t(table)
        if t["created"].pop(rec_id, None) is None:
            t["changed"].pop(rec_id, None)
            t["destroyed"].append(rec_id)

    def field_created(self, table, f):
        self.t(table)["fields_created"][f.id] = {"name": f.name, "type": f.type}

    def field_changed(self, table, f, current, previous):
        self.t(table)["fields_changed"][f.id] = (current, previous)

    def field_destroyed(self, table, f):
        self.t(table)["fields_destroyed"].append(f.id)

    def metadata_changed(self, table, current, previous):
        self.t(table)["metadata"] = (current, previous)

    def table_created(self, table):
        self.created_tables[table.id] = table

    def table_destroyed(self, table):
        self.tables.pop(table.id, None)
        self.destroyed_tables.append(table.id)

    def empty(self):
        return not self.created_tables and not self.destroyed_tables and not any(
            any(v for v in t.values()) for t in self.tables.values())

    def commit(self):
        w = self.world
        if self.empty():
            return
        base = self.base
        base.transaction += 1           # counts every change to the base, watched or not
        if not self.tracking:
            return
        timestamp = fmt_ts(w.now())
        for hook in base.webhooks.values():
            if not hook.enabled(w.now()):
                continue
            if hook.filters().get("recordChangeScope") in self.destroyed_tables:
                # The watched table is gone: one error payload, then the hook is off for good.
                hook.append(w, {"timestamp": timestamp, "baseTransactionNumber": base.transaction,
                                "payloadFormat": "v0", "error": True, "code": "INVALID_FILTERS"})
                hook.disabled = True
                continue
            for body in hook.build_payloads(w, self):
                body = dict({"timestamp": timestamp, "baseTransactionNumber": base.transaction,
                             "actionMetadata": action_metadata(self.source), "payloadFormat": "v0"}, **body)
                hook.append(w, body)


def action_metadata(source):
    if source in ("client", "publicApi", "formSubmission", "formPageSubmission", "anonymousUser"):
        user = {k: USER[k] for k in ("id", "email", "permissionLevel", "name")}
        return {"source": source, "sourceMetadata": {"user": user}}
    return {"source": source}


class Webhook:
    def __init__(self, world, hid, base, spec, url, secret):
        self.id = hid
        self.base = base
        self.spec = spec
        self.notification_url = url
        self.mac_secret = secret
        self.created = world.now()
        self.expires = self.created + timedelta(seconds=world.cfg.webhook_ttl)
        self.disabled = False          # turned off for an error (e.g. its table was deleted)
        self.notifications_enabled = url is not None
        self.payloads = []             # [(number, created datetime, body)]
        self.next_cursor = 1
        self.last_result = None
        self.last_success = None
        self.world = world
        self.pinger = Debouncer(world.webhook_sender, PING_DEBOUNCE, lambda items: send_ping(world, self))

    def enabled(self, now):
        return not self.disabled and now < self.expires

    def gone(self, now):
        return now >= self.expires + DISABLED_WEBHOOK_GRACE

    def filters(self):
        return self.spec["options"].get("filters", {})

    def includes(self):
        return self.spec["options"].get("includes", {})

    def extend(self, world):
        self.expires = world.now() + timedelta(seconds=world.cfg.webhook_ttl)

    def append(self, world, body):
        self.payloads.append((self.next_cursor, world.now(), body))
        self.next_cursor += 1
        if self.notification_url and self.notifications_enabled:
            if world.webhook_sender.held:
                world.webhook_sender.record({"webhook_id": self.id, "base_id": self.base.id},
                                           self.notification_url, 1, "dropped")
            else:
                self.pinger.add(self.next_cursor - 1)

    def prune(self, world):
        cutoff = world.now() - timedelta(seconds=world.cfg.payload_retention)
        while self.payloads and self.payloads[0][1] < cutoff:
            self.payloads.pop(0)

    def meta(self):
        return {"id": self.id, "areNotificationsEnabled": self.notifications_enabled,
                "cursorForNextPayload": self.next_cursor, "expirationTime": fmt_ts(self.expires),
                "isHookEnabled": None, "lastNotificationResult": self.last_result,
                "lastSuccessfulNotificationTime": self.last_success,
                "notificationUrl": self.notification_url, "specification": self.spec}

    # -- payload building ------------------------------------------------------

    def wants(self, data_type, change_type):
        f = self.filters()
        if data_type not in f.get("dataTypes", []):
            return False
        types = f.get("changeTypes")
        return not types or change_type in types

    def in_scope(self, table_id):
        scope = self.filters().get("recordChangeScope")
        return not scope or scope == table_id

    def build_payloads(self, w, tx):
        """Payload bodies (without the common header) this webhook gets for tx."""
        tables, record_items = {}, []
        for tid, ch in tx.tables.items():
            if not self.in_scope(tid):
                continue
            table = w.table_by_id(tid)
            entry = self.schema_changes(ch)
            if entry:
                tables[tid] = entry
            record_items += self.record_changes(w, table, ch)
        out = {}
        if tables:
            out["changedTablesById"] = tables
        if self.wants("tableFields", "add") or self.wants("tableMetadata", "add"):
            created = {tid: {"metadata": {"name": t.name, "description": t.description},
                             "fieldsById": {f.id: {"name": f.name, "type": f.type} for f in t.fields},
                             "recordsById": {}}
                       for tid, t in tx.created_tables.items() if self.in_scope(tid)}
            if created:
                out["createdTablesById"] = created
        if tx.destroyed_tables and (self.wants("tableFields", "remove") or self.wants("tableMetadata", "remove")):
            out["destroyedTableIds"] = list(tx.destroyed_tables)
        bodies = []
        for i in range(0, max(1, len(record_items)), RECORDS_PER_PAYLOAD):
            chunk = record_items[i:i + RECORDS_PER_PAYLOAD]
            body = json.loads(json.dumps(out)) if i == 0 else {}
            for tid, kind, key, value in chunk:
                entry = body.setdefault("changedTablesById", {}).setdefault(tid, {})
                if kind == "destroyedRecordIds":
                    entry.setdefault(kind, []).append(key)
                else:
                    entry.setdefault(kind, {})[key] = value
            if body:
                bodies.append(body)
        return bodies

    def schema_changes(self, ch):
        entry = {}
        if ch["fields_created"] and self.wants("tableFields", "add"):
            entry["createdFieldsById"] = dict(ch["fields_created"])
        if ch["fields_changed"] and self.wants("tableFields", "update"):
            prev = self.includes().get("includePreviousFieldDefinitions")
            entry["changedFieldsById"] = {fid: ({"current": cur, "previous": old} if prev else {"current": cur})
                                          for fid, (cur, old) in ch["fields_changed"].items()}
        if ch["fields_destroyed"] and self.wants("tableFields", "remove"):
            entry["destroyedFieldIds"] = list(ch["fields_destroyed"])
        if ch["metadata"] and self.wants("tableMetadata", "update"):
            cur, old = ch["metadata"]
            entry["changedMetadata"] = {"current": cur, "previous": old}
        return entry

    def watched(self, field_ids):
        watch = self.filters().get("watchDataInFieldIds")
        return not watch or any(f in watch for f in field_ids)

    def record_changes(self, w, table, ch):
        """[(table id, kind, rec id, value)] for record-level changes, in a stable order."""
        items = []
        if table is None:
            return items
        if self.wants("tableData", "add"):
            for rid, rec in ch["created"].items():
                if rid in table.records:
                    cells = w.cells_v2(table, rec)
                    if self.watched(cells):
                        items.append((table.id, "createdRecordsById", rid,
                                      {"createdTime": fmt_ts(rec.created), "cellValuesByFieldId": cells}))
        if self.wants("tableData", "update"):
            for rid, (rec, before) in ch["changed"].items():
                if rid not in table.records:
                    continue
                after = w.cells_v2(table, rec)
                diff = [fid for fid in set(before) | set(after) if before.get(fid) != after.get(fid)]
                diff.sort(key=lambda fid: [f.id for f in table.fields].index(fid)
                          if table.field(fid) else 0)
                if not diff or not self.watched(diff):
                    continue
                value = {"current": {"cellValuesByFieldId": {fid: after.get(fid) for fid in diff}}}
                if self.includes().get("includePreviousCellValues"):
                    value["previous"] = {"cellValuesByFieldId": {fid: before.get(fid) for fid in diff}}
                wanted = self.includes().get("includeCellValuesInFieldIds")
                if wanted:
                    ids = [f.id for f in table.fields] if wanted == "all" else wanted
                    value["unchanged"] = {"cellValuesByFieldId": {fid: after.get(fid) for fid in ids
                                                                  if fid not in diff and fid in after}}
                items.append((table.id, "changedRecordsById", rid, value))
        if self.wants("tableData", "remove"):
            for rid in ch["destroyed"]:
                items.append((table.id, "destroyedRecordIds", rid, None))
        return items


def ping_body(world, hook):
    return json.dumps({"base": {"id": hook.base.id}, "webhook": {"id": hook.id},
                       "timestamp": fmt_ts(world.now())}, separators=(",", ":")).encode()


def ping_headers(secret, body, mac=None):
    if mac is None:
        mac = "hmac-sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    return {"Content-Type": "application/json", "X-Airtable-Content-MAC": mac}


def send_ping(world, hook):
    """Queue one notification ping (the sender's thread POSTs it, retrying failures); remember each
    attempt's outcome in lastNotificationResult like Airtable."""
    started = [0.0]

    def build(attempt):
        with world.lock:
            if (hook.base not in world.bases or hook.base.webhooks.get(hook.id) is not hook
                    or not hook.notification_url or not hook.notifications_enabled
                    or not hook.enabled(world.now())):
                return None             # deleted, expired or notifications switched off meanwhile
            body = ping_body(world, hook)
            url = hook.notification_url
        started[0] = time.time()
        return url, body, ping_headers(hook.mac_secret, body)

    def on_result(attempt, status, ok, final):
        if status in ("dropped", "cancelled"):
            return
        result = {"success": ok}
        if not ok:
            result["error"] = {"message": status if isinstance(status, str) else "HTTP status %d" % status}
        with world.lock:
            result.update({"completionTimestamp": fmt_ts(world.now()),
                           "durationMs": int((time.time() - started[0]) * 1000), "retryNumber": attempt - 1})
            if not ok:
                result["willBeRetried"] = not final
            hook.last_result = result
            if ok:
                hook.last_success = result["completionTimestamp"]

    world.webhook_sender.submit(build, {"webhook_id": hook.id, "base_id": hook.base.id}, on_result,
                                url=hook.notification_url)


# ----------------------------------------------------------------------------
# List records: parameters, iterators, pages
# ----------------------------------------------------------------------------

class ListQuery:
    def __init__(self):
        self.page_size = MAX_PAGE_SIZE
        self.max_records = None
        self.offset = None
        self.view = None
        self.formula = None
        self.cell_format = "json"
        self.time_zone = None
        self.user_locale = None
        self.by_id = False
        self.fields = None          # list of names/ids, or None for all
        self.sort = []              # [(field name/id, direction)]
        self.comment_count = False

    def key(self):
        """What an iterator is bound to (fields/pageSize/format may change between pages)."""
        return json.dumps([self.view, self.formula, self.sort, self.max_records], ensure_ascii=False)


SORT_KEY_RE = re.compile(r"^sort\[(\d+)\]\[(field|direction)\]$")
FIELDS_KEY_RE = re.compile(r"^fields\[\d*\]$")
RECORD_META_RE = re.compile(r"^recordMetadata\[\d*\]$")
SCALAR_PARAMS = {"pageSize", "maxRecords", "offset", "view", "filterByFormula", "cellFormat", "timeZone",
                 "userLocale", "returnFieldsByFieldId"}


def parse_bool(text):
    if isinstance(text, bool):
        return text
    if text in ("true", "1"):
        return True
    if text in ("false", "0", ""):
        return False
    raise invalid_request()


def parse_int(text, lo, hi):
    try:
        n = int(text)
    except (TypeError, ValueError):
        raise invalid_request()
    if isinstance(text, bool) or not lo <= n <= hi:
        raise invalid_request()
    return n


def list_query_from_params(pairs):
    """GET query string -> ListQuery; unknown or repeated parameters are rejected (422)."""
    scalars, fields, sorts, meta = {}, [], {}, []
    for k, v in pairs:
        if k in SCALAR_PARAMS:
            if k in scalars:
                raise invalid_request()
            scalars[k] = v
        elif FIELDS_KEY_RE.match(k):
            fields.append(v)
        elif RECORD_META_RE.match(k):
            meta.append(v)
        elif SORT_KEY_RE.match(k):
            idx, part = SORT_KEY_RE.match(k).groups()
            sorts.setdefault(int(idx), {})[part] = v
        else:
            raise invalid_request()
    sort = []
    for idx in sorted(sorts):
        sort.append({"field": sorts[idx].get("field"), "direction": sorts[idx].get("direction", "asc")})
    return build_list_query(scalars, fields if fields else None, sort, meta)


def list_query_from_body(body):
    """POST listRecords JSON body -> ListQuery."""
    if not isinstance(body, dict):
        raise invalid_request()
    allowed = SCALAR_PARAMS | {"fields", "sort", "recordMetadata"}
    if any(k not in allowed for k in body):
        raise invalid_request()
    scalars = {k: body[k] for k in SCALAR_PARAMS if k in body and body[k] is not None}
    fields = body.get("fields")
    sort = body.get("sort") or []
    if fields is not None and (not isinstance(fields, list) or not all(isinstance(x, str) for x in fields)):
        raise invalid_request()
    if not isinstance(sort, list) or not all(isinstance(s, dict) for s in sort):
        raise invalid_request()
    return build_list_query(scalars, fields, sort, body.get("recordMetadata") or [])


def build_list_query(scalars, fields, sort, meta):
    q = ListQuery()
    if "pageSize" in scalars:
        q.page_size = parse_int(scalars["pageSize"], 1, MAX_PAGE_SIZE)
    if "maxRecords" in scalars:
        q.max_records = parse_int(scalars["maxRecords"], 1, 10 ** 9)
    q.offset = scalars.get("offset") or None
    q.view = scalars.get("view") or None
    q.formula = scalars.get("filterByFormula") or None
    q.cell_format = scalars.get("cellFormat", "json")
    if q.cell_format not in ("json", "string"):
        raise invalid_request()
    q.time_zone, q.user_locale = scalars.get("timeZone"), scalars.get("userLocale")
    if q.cell_format == "string" and not (q.time_zone and q.user_locale):
        raise invalid_request("The timeZone and userLocale parameters are required when using string as "
                              "the cellFormat.")
    q.by_id = parse_bool(scalars.get("returnFieldsByFieldId", "false"))
    q.fields = fields
    for s in sort:
        if not s.get("field") or s.get("direction", "asc") not in ("asc", "desc"):
            raise invalid_request()
    q.sort = [(s["field"], s.get("direction", "asc")) for s in sort]
    if any(m != "commentCount" for m in meta):
        raise invalid_request()
    q.comment_count = bool(meta)
    return q


def sort_key_value(v):
    """Total order over formula values: blanks first, then booleans, numbers, dates, text."""
    if v is None or v == "" or v == []:
        return (0, 0)
    if isinstance(v, bool):
        return (1, int(v))
    if isinstance(v, (int, float)):
        return (2, v)
    if isinstance(v, datetime):
        return (3, v.timestamp())
    return (4, f_text(v).lower())


class Iterator:
    def __init__(self, itr_id, table_id, key, ids, now):
        self.id = itr_id
        self.table_id = table_id
        self.key = key
        self.ids = ids                 # matching record ids, fixed at creation
        self.positions = {}            # last rec id of a served page -> index after it
        self.last_used = now


# ----------------------------------------------------------------------------
# HTTP
# ----------------------------------------------------------------------------

def dumps(obj):
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


class Handler(FaultDelivery, BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "Airtable"
    world: World = None      # set by main()
    verbose = False

    # -- plumbing --------------------------------------------------------------

    def setup(self):
        super().setup()
        # Headers and body leave in separate writes; without NODELAY a keep-alive client
        # waits ~40 ms per response for the delayed ACK (Nagle).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def version_string(self):
        return self.server_version

    def log_message(self, fmt, *args):
        if self.verbose:
            sys.stderr.write("fake_airtable: " + (fmt % args) + "\n")

    def date_time_string(self, timestamp=None):
        """Date header follows the (possibly shifted) server clock."""
        return email.utils.formatdate(self.world.now().timestamp(), usegmt=True)

    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def do_PATCH(self):
        self.dispatch("PATCH")

    def do_PUT(self):
        self.dispatch("PUT")

    def do_DELETE(self):
        self.dispatch("DELETE")

    def do_HEAD(self):
        self.dispatch("HEAD")

    def read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def send(self, status, body=b"", ctype=JSON_TYPE, headers=None):
        """Write a complete response (always with Content-Length, so keep-alive works)."""
        fault, self.answer_fault = getattr(self, "answer_fault", None), None
        if fault is not None:
            self.send_faulted(fault, status, body, ctype, headers)
            return
        if body and "gzip" in (self.headers.get("Accept-Encoding") or "") and len(body) > 1024:
            body = gzip.compress(body, compresslevel=1)
            headers = dict(headers or {}, **{"Content-Encoding": "gzip", "Vary": "Accept-Encoding"})
        self.send_response(status)
        if body or status not in (204, 304):
            self.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0" if status in (204, 304) else str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and status not in (204, 304):
            self.wfile.write(body)
        self.status_sent = status

    def dispatch(self, method):
        self.status_sent = 0
        self.answer_fault = self.stall_until = None
        split = urlsplit(self.path)
        path, query = split.path, split.query
        body = self.read_body() if method in ("POST", "PATCH", "PUT", "DELETE") else b""
        if path == "/__admin" or path.startswith("/__admin/"):
            self.handle_admin(method, path, query, body)
            return
        started = time.time()
        endpoint = "other"
        try:
            endpoint = self.handle_api(method, path, query, body)
            self.finish_fault()
        finally:
            self.world.log_request({"t": started, "method": method, "path": path, "query": query,
                                    "status": self.status_sent}, endpoint)

    # -- public API --------------------------------------------------------------

    def handle_api(self, method, path, query, body):
        """Serve one non-admin request; returns the endpoint label for stats."""
        segs = [unquote(s) for s in path.split("/")[1:]]
        endpoint = classify(method, segs)
        fault = self.world.take_fault(path + ("?" + query if query else ""))
        if fault and self.apply_fault(fault, path):
            return endpoint
        try:
            if segs[:2] == ["oauth2", "v1"] and len(segs) == 3:
                with self.world.lock:
                    self.handle_oauth(method, segs[2], query, body)
                return endpoint
            if len(self.requestline) > MAX_URL_CHARS:
                raise api_error(414, "INVALID_REQUEST_URL_TOO_LONG",
                                "The URL is too long; use POST .../listRecords for long parameters.")
            with self.world.lock:
                status, payload = self.handle_v0(method, segs, query, body, endpoint)
            self.send(status, dumps(payload))
        except OAuthError as e:
            self.send(e.status, dumps(e.body), headers={"Cache-Control": "no-store", "Pragma": "no-cache"})
        except ApiError as e:
            self.send(e.status, dumps(e.body), headers=e.headers)
        except Exception:
            # A bug in the fake must show up as a loud 500, not as a silently dropped connection.
            traceback.print_exc()
            self.send(500, dumps(default_error_body(500)))
        return endpoint

    def apply_fault(self, fault, path):
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
            payload = body.encode() if isinstance(body, str) else dumps(body)
        elif path.startswith("/oauth2/"):
            payload = dumps({"error": "server_error", "error_description": "HTTP %d" % status}
                            if status >= 500 else {"error": "invalid_grant",
                                                   "error_description": "The refresh token is invalid."})
        else:
            payload = dumps(default_error_body(status))
        headers = dict(fault.get("headers") or {})
        if fault.get("truncate") or fault.get("stall") or fault.get("corrupt"):
            self.send_faulted(fault, status, payload, fault.get("content_type") or JSON_TYPE, headers)
            return True
        self.send(status, payload, ctype=fault.get("content_type") or JSON_TYPE, headers=headers)
        return True

    def fault_log(self, status):
        self.status_sent = status

    def fault_owner(self):
        return self.world

    # -- OAuth -------------------------------------------------------------------

    def handle_oauth(self, method, leaf, query, body):
        if leaf == "authorize" and method == "GET":
            self.oauth_authorize(dict(parse_qsl(query, keep_blank_values=True)))
        elif leaf == "token":
            if method != "POST":
                raise OAuthError(405, "invalid_request", "The token endpoint only accepts POST.")
            self.oauth_token(body)
        else:
            raise ApiError(404, {"error": "NOT_FOUND"})

    def oauth_authorize(self, params):
        """Auto-consenting authorize endpoint: validates the request, redirects with a code."""
        w, cfg = self.world, self.world.cfg
        redirect = params.get("redirect_uri", "")
        if params.get("client_id") != cfg.client_id or redirect != cfg.redirect_uri:
            self.send(400, b"Invalid client_id or redirect_uri", ctype="text/plain; charset=utf-8")
            return

        def back(**kw):
            kw.setdefault("state", params.get("state", ""))
            sep = "&" if "?" in redirect else "?"
            self.send(302, b"", headers={"Location": redirect + sep + urlencode(kw)})

        scopes = params.get("scope", "").split()
        if params.get("response_type") != "code":
            return back(error="unsupported_response_type", error_description="response_type must be code")
        if params.get("code_challenge_method") != "S256" or not params.get("code_challenge"):
            return back(error="invalid_request", error_description="PKCE with S256 is required")
        if not params.get("state"):
            return back(error="invalid_request", error_description="state is required")
        if not scopes or any(s not in ALL_SCOPES for s in scopes):
            return back(error="invalid_scope", error_description="invalid scope")
        code = w.new_token("oac")
        w.auth_codes[code] = {"challenge": params["code_challenge"], "redirect_uri": redirect,
                              "scopes": scopes, "expires": w.now() + AUTH_CODE_LIFETIME, "used": False}
        back(code=code)

    def oauth_client_ok(self, form):
        cfg = self.world.cfg
        auth = self.headers.get("Authorization") or ""
        if cfg.client_secret:
            expected = "Basic " + base64.b64encode(("%s:%s" % (cfg.client_id, cfg.client_secret)).encode()).decode()
            return hmac.compare_digest(auth, expected)
        return form.get("client_id") == cfg.client_id

    def oauth_token(self, body):
        w = self.world
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            raise OAuthError(400, "invalid_request", "Content-Type must be application/x-www-form-urlencoded")
        form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        if not self.oauth_client_ok(form):
            raise OAuthError(401, "invalid_client", "Client authentication failed.")
        grant_type = form.get("grant_type")
        if grant_type == "refresh_token":
            result = self.refresh_grant(form)
        elif grant_type == "authorization_code":
            result = self.code_grant(form)
        else:
            raise OAuthError(400, "unsupported_grant_type", "Unsupported grant_type.")
        self.send(200, dumps(result), headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    def refresh_grant(self, form):
        w = self.world
        token = form.get("refresh_token", "")
        info = w.refresh_tokens.get(token)
        if info is None:
            raise OAuthError(400, "invalid_grant", "The refresh token is invalid.")
        grant = w.grants[info["grant"]]
        if info["used"]:
            # Replayed refresh token: treat the whole grant as compromised (default), or just refuse.
            if w.cfg.refresh_reuse == "revoke":
                w.revoke_grant(grant["id"])
            raise OAuthError(400, "invalid_grant", "The refresh token has already been used.")
        if grant["revoked"]:
            raise OAuthError(400, "invalid_grant", "The authorization grant has been revoked.")
        if info["expires"] <= w.now():
            raise OAuthError(400, "invalid_grant", "The refresh token has expired.")
        if form.get("scope"):
            wanted = form["scope"].split()
            if any(s not in grant["scopes"] for s in wanted):
                raise OAuthError(400, "invalid_scope", "Requested scope exceeds the original grant.")
        info["used"] = True
        if w.cfg.rotate_access_on_refresh:
            for tok in [t for t, a in w.access_tokens.items() if a["grant"] == grant["id"]]:
                del w.access_tokens[tok]
        return w.issue_tokens(grant["id"])

    def code_grant(self, form):
        w = self.world
        code = w.auth_codes.get(form.get("code", ""))
        if code is None or code["used"] or code["expires"] <= w.now():
            raise OAuthError(400, "invalid_grant", "The authorization code is invalid or expired.")
        if form.get("redirect_uri") != code["redirect_uri"]:
            raise OAuthError(400, "invalid_grant", "redirect_uri does not match the authorization request.")
        verifier = form.get("code_verifier", "")
        digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
        if not (43 <= len(verifier) <= 128) or not hmac.compare_digest(digest, code["challenge"]):
            raise OAuthError(400, "invalid_grant", "code_verifier does not match the code_challenge.")
        code["used"] = True
        return w.new_grant(code["scopes"])

    # -- /v0 ---------------------------------------------------------------------

    def authenticate(self):
        auth = self.headers.get("Authorization") or ""
        parts = auth.split(None, 1)
        if len(parts) != 2 or parts[0].lower() != "bearer" or not parts[1].strip():
            raise api_error(401, "AUTHENTICATION_REQUIRED", "Authentication required")
        principal = self.world.principal(parts[1].strip())
        if principal is None:
            raise api_error(401, "UNAUTHORIZED", "Invalid authentication token")
        return principal

    def resolve_base(self, principal, base_id):
        if not BASE_ID_RE.match(base_id):
            raise route_not_found()
        base = self.world.base(base_id)
        if base is None or (principal["bases"] is not None and base_id not in principal["bases"]):
            raise model_not_found()
        return base

    @staticmethod
    def require(principal, *scopes):
        if any(s not in principal["scopes"] for s in scopes):
            raise model_not_found()

    def throttle(self, principal, base):
        """Monthly cap, then per-token and per-base windows (with the 30 s penalty)."""
        w = self.world
        limit = w.rate["monthly_limit"]
        if limit and w.monthly_used >= limit:
            raise api_error(429, "PUBLIC_API_BILLING_LIMIT_EXCEEDED",
                            "The API call limit for this workspace's billing plan has been exceeded.")
        base_key = "base:" + base.id if base else None
        token_key = principal["key"]
        # A base already in its penalty box answers 429 without using up token budget.
        if base_key and w.in_penalty(base_key) and not w.rate["penalty_extends"]:
            w.rate_limited += 1
            raise rate_limited()
        if token_key and not w.admit(token_key, w.rate["per_token"]):
            w.rate_limited += 1
            raise rate_limited()
        if base_key and not w.admit(base_key, w.rate["per_base"]):
            w.rate_limited += 1
            raise rate_limited()
        w.monthly_used += 1

    def handle_v0(self, method, segs, query, body, endpoint):
        """Route /v0/...; returns (status, JSON-able body)."""
        if not segs or segs[0] != "v0" or len(segs) < 2:
            raise route_not_found()
        rest = segs[1:]
        route = match_route(method, rest)
        if route is None:
            raise route_not_found()
        name, args = route
        principal = self.authenticate()
        base = self.resolve_base(principal, args["base"]) if "base" in args else None
        scopes = ROUTE_SCOPES[name]
        self.require(principal, *scopes)
        self.throttle(principal, base)
        handler = getattr(self, "api_" + name)
        return handler(principal, base, args, query, body)

    # each api_* returns (status, body)

    def api_whoami(self, principal, base, args, query, body):
        out = {"id": principal["user"], "scopes": list(principal["scopes"])}
        if "user.email:read" in principal["scopes"]:
            out["email"] = USER["email"]
        return 200, out

    def api_list_bases(self, principal, base, args, query, body):
        bases = [b for b in self.world.bases if principal["bases"] is None or b.id in principal["bases"]]
        return 200, {"bases": [{"id": b.id, "name": b.name, "permissionLevel": "create"} for b in bases]}

    def api_base_schema(self, principal, base, args, query, body):
        include = []
        for k, v in parse_qsl(query, keep_blank_values=True):
            if not re.match(r"^include\[\d*\]$", k) or v != "visibleFieldIds":
                raise invalid_request()
            include.append(v)
        return 200, {"tables": [t.meta(bool(include)) for t in base.tables]}

    def table_or_403(self, base, key):
        table = base.table(key)
        if table is None:
            raise model_not_found()
        return table

    def api_list_records(self, principal, base, args, query, body):
        table = self.table_or_403(base, args["table"])
        if args.get("post"):
            try:
                payload = json.loads(body) if body.strip() else {}
            except ValueError:
                raise api_error(400, "INVALID_REQUEST_BODY", "Could not parse request body as JSON.")
            q = list_query_from_body(payload)
        else:
            q = list_query_from_params(parse_qsl(query, keep_blank_values=True))
        return 200, self.list_page(table, q)

    def api_get_record(self, principal, base, args, query, body):
        table = self.table_or_403(base, args["table"])
        params = dict(parse_qsl(query, keep_blank_values=True))
        if any(k not in ("returnFieldsByFieldId", "cellFormat", "timeZone", "userLocale") for k in params):
            raise invalid_request()
        rec = table.records.get(args["record"])
        if rec is None:
            raise ApiError(404, {"error": {"type": "MODEL_ID_NOT_FOUND",
                                           "message": "Could not find a record with ID %s." % args["record"]}})
        by_id = parse_bool(params.get("returnFieldsByFieldId", "false"))
        return 200, self.world.render_record(table, rec, table.fields, by_id)

    def list_page(self, table, q):
        w = self.world
        fields = self.selected_fields(table, q)
        tz = self.time_zone(q)
        itr, start = self.iterator_for(table, q)
        ids, pos, page = itr.ids, start, []
        while pos < len(ids) and len(page) < q.page_size:
            rec = table.records.get(ids[pos])
            pos += 1
            if rec is not None:
                page.append(rec)
        out = {"records": [w.render_record(table, r, fields, q.by_id, q.cell_format, tz, q.comment_count)
                           for r in page]}
        itr.last_used = w.now()
        if pos < len(ids) and page:
            itr.positions[page[-1].id] = pos
            out["offset"] = "%s/%s" % (itr.id, page[-1].id)
        return out

    def selected_fields(self, table, q):
        if q.fields is None:
            return table.fields
        out = []
        for key in q.fields:
            f = table.field(key)
            if f is None:
                raise api_error(422, "UNKNOWN_FIELD_NAME", 'Unknown field name: "%s"' % key)
            if f not in out:
                out.append(f)
        return out

    @staticmethod
    def time_zone(q):
        if q.cell_format != "string":
            return UTC
        try:
            from zoneinfo import ZoneInfo
            return ZoneInfo(q.time_zone) if q.time_zone not in ("utc", "UTC") else UTC
        except Exception:
            raise invalid_request("Invalid timeZone: %s" % q.time_zone)

    def iterator_for(self, table, q):
        """(Iterator, start index): resume an offset or start a new scan."""
        w = self.world
        if q.offset is None:
            return self.new_iterator(table, q), 0
        m = OFFSET_RE.match(q.offset)
        if not m:
            raise api_error(422, "INVALID_OFFSET_VALUE", "The value of offset %s is invalid" % q.offset)
        itr = w.iterators.get(m.group(1))
        now = w.now()
        if itr is not None and now - itr.last_used > timedelta(seconds=w.cfg.offset_ttl):
            del w.iterators[itr.id]
            itr = None
        if itr is not None and itr.table_id != table.id:
            raise api_error(422, "INVALID_OFFSET_VALUE", "The value of offset %s is invalid" % q.offset)
        if itr is None or itr.key != q.key() or m.group(2) not in itr.positions:
            # Expired, evicted (admin/"server restart"), or replayed with different parameters.
            raise iterator_gone()
        return itr, itr.positions[m.group(2)]

    def new_iterator(self, table, q):
        w = self.world
        recs = self.view_records(table, q.view)
        if q.formula:
            pred = self.compile_filter(table, q.formula)
            recs = [r for r in recs if self.matches(pred, table, r)]
        for key, direction in reversed(q.sort):
            f = table.field(key)
            if f is None:
                raise api_error(422, "UNKNOWN_FIELD_NAME", 'Unknown field name: "%s"' % key)
            recs.sort(key=lambda r: self.sort_value(table, f, r), reverse=(direction == "desc"))
        ids = [r.id for r in recs]
        if q.max_records is not None:
            ids = ids[:q.max_records]
        self.purge_iterators()
        itr = Iterator(w.ids.new("itr"), table.id, q.key(), ids, w.now())
        w.iterators[itr.id] = itr
        return itr

    def sort_value(self, table, f, rec):
        try:
            return sort_key_value(self.world.formula_input(table, f, rec))
        except FormulaEvalError:
            return (5, 0)

    def purge_iterators(self):
        w = self.world
        cutoff = w.now() - timedelta(seconds=w.cfg.offset_ttl)
        for iid in [i for i, itr in w.iterators.items() if itr.last_used < cutoff]:
            del w.iterators[iid]
        while len(w.iterators) > 10000:
            w.iterators.pop(next(iter(w.iterators)))

    @staticmethod
    def view_records(table, view):
        if view is not None and not any(v["id"] == view or v["name"] == view for v in table.views):
            raise api_error(422, "VIEW_NAME_NOT_FOUND", 'Could not find view "%s"' % view)
        return list(table.records.values())

    def compile_filter(self, table, text):
        # filterByFormula references fields by name only ({Name} or a bare identifier).
        try:
            fn, _ = compile_formula(text, table.field_by_name)
        except FormulaUnknownFields as e:
            raise bad_formula("Unknown field names: %s" % ", ".join(n.lower() for n in e.names))
        except FormulaSyntaxError:
            raise bad_formula()
        return fn

    def matches(self, pred, table, rec):
        try:
            return f_truthy(pred(EvalContext(self.world, table, rec)))
        except FormulaEvalError:
            return False

    # -- webhooks ------------------------------------------------------------------

    def hook_or_404(self, base, hook_id):
        hook = base.webhooks.get(hook_id)
        if hook is None or hook.gone(self.world.now()):
            raise api_error(404, "NOT_FOUND", "Could not find webhook %s" % hook_id)
        return hook

    def hook_meta(self, hook):
        d = hook.meta()
        d["isHookEnabled"] = hook.enabled(self.world.now())
        return d

    def api_list_webhooks(self, principal, base, args, query, body):
        now = self.world.now()
        return 200, {"webhooks": [self.hook_meta(h) for h in base.webhooks.values() if not h.gone(now)]}

    def api_create_webhook(self, principal, base, args, query, body):
        w = self.world
        try:
            payload = json.loads(body) if body.strip() else None
        except ValueError:
            raise api_error(400, "INVALID_REQUEST_BODY", "Could not parse request body as JSON.")
        spec = validate_webhook_request(payload, base)
        needs = {"tableData": "data.records:read", "tableFields": "schema.bases:read",
                 "tableMetadata": "schema.bases:read"}
        self.require(principal, *{needs[d] for d in spec["options"]["filters"]["dataTypes"]})
        now = w.now()
        live = [h for h in base.webhooks.values() if not h.gone(now)]
        if len(live) >= MAX_WEBHOOKS_PER_BASE:
            raise api_error(422, "TOO_MANY_WEBHOOKS_IN_BASE",
                            "This base already has the maximum of %d webhooks." % MAX_WEBHOOKS_PER_BASE)
        secret = secrets.token_bytes(32)
        hook = Webhook(w, w.ids.new("ach"), base, spec, payload.get("notificationUrl"), secret)
        base.webhooks[hook.id] = hook
        return 200, {"id": hook.id, "macSecretBase64": base64.b64encode(secret).decode(),
                     "expirationTime": fmt_ts(hook.expires)}

    def api_delete_webhook(self, principal, base, args, query, body):
        hook = self.hook_or_404(base, args["webhook"])
        del base.webhooks[hook.id]
        hook.pinger.discard()
        return 200, {}

    def api_refresh_webhook(self, principal, base, args, query, body):
        hook = self.hook_or_404(base, args["webhook"])
        if not hook.enabled(self.world.now()):
            raise invalid_request("Cannot refresh a webhook that is disabled or expired.")
        hook.extend(self.world)
        return 200, {"expirationTime": fmt_ts(hook.expires)}

    def api_enable_notifications(self, principal, base, args, query, body):
        hook = self.hook_or_404(base, args["webhook"])
        try:
            payload = json.loads(body) if body.strip() else {}
        except ValueError:
            raise api_error(400, "INVALID_REQUEST_BODY", "Could not parse request body as JSON.")
        if not isinstance(payload, dict) or not isinstance(payload.get("enable"), bool):
            raise invalid_request()
        hook.notifications_enabled = payload["enable"]
        return 200, {}

    def api_webhook_payloads(self, principal, base, args, query, body):
        w = self.world
        hook = self.hook_or_404(base, args["webhook"])
        params = dict(parse_qsl(query, keep_blank_values=True))
        if any(k not in ("cursor", "limit") for k in params):
            raise invalid_request()
        cursor = parse_int(params.get("cursor", 1), 1, 2 ** 53)
        limit = parse_int(params.get("limit", MAX_PAYLOADS_PER_REQUEST), 1, MAX_PAYLOADS_PER_REQUEST)
        needs = {"tableData": "data.records:read", "tableFields": "schema.bases:read",
                 "tableMetadata": "schema.bases:read"}
        self.require(principal, *{needs[d] for d in hook.filters().get("dataTypes", [])})
        if hook.enabled(w.now()):
            hook.extend(w)          # listing payloads keeps an active webhook alive
        hook.prune(w)
        avail = [p for p in hook.payloads if p[0] >= cursor]
        chosen = avail[:limit]
        next_cursor = chosen[-1][0] + 1 if chosen else cursor
        return 200, {"payloads": [p[2] for p in chosen], "cursor": next_cursor,
                     "mightHaveMore": len(avail) > len(chosen)}

    # -- admin -----------------------------------------------------------------------

    def handle_admin(self, method, path, query, body):
        try:
            payload = json.loads(body) if body.strip() else {}
        except ValueError:
            self.send(400, dumps({"error": "body is not JSON"}))
            return
        params = dict(parse_qsl(query, keep_blank_values=True))
        parts = [unquote(p) for p in path.rstrip("/").split("/")[2:]]
        try:
            if (method, parts) == ("POST", ["webhooks", "send"]):
                # Not under the lock: the receiver may call the API while it answers the ping.
                status, result = 200, admin_webhook_send(self.world, payload)
            else:
                with self.world.lock:
                    status, result = admin_route(self.world, method, parts, params, payload)
        except AdminError as e:
            status, result = e.status, {"error": str(e)}
        except Exception as e:
            traceback.print_exc()
            status, result = 500, {"error": "fake_airtable bug: %r" % e}
        self.send(status, dumps(result))


# -- routing tables -------------------------------------------------------------

ROUTE_SCOPES = {
    "whoami": (),
    "list_bases": ("schema.bases:read",),
    "base_schema": ("schema.bases:read",),
    "list_records": ("data.records:read",),
    "get_record": ("data.records:read",),
    "list_webhooks": ("webhook:manage",),
    "create_webhook": ("webhook:manage",),
    "delete_webhook": ("webhook:manage",),
    "refresh_webhook": ("webhook:manage",),
    "enable_notifications": ("webhook:manage",),
    "webhook_payloads": ("webhook:manage",),
}


def match_route(method, rest):
    """rest = path segments after /v0 -> (route name, args) or None."""
    n = len(rest)
    if rest[0] == "meta":
        if method == "GET" and rest[1:] == ["whoami"]:
            return "whoami", {}
        if method == "GET" and rest[1:] == ["bases"]:
            return "list_bases", {}
        if method == "GET" and n == 4 and rest[1] == "bases" and rest[3] == "tables":
            return "base_schema", {"base": rest[2]}
        return None
    if rest[0] == "bases" and n >= 3 and rest[2] == "webhooks":
        args = {"base": rest[1]}
        if n == 3:
            return {"GET": ("list_webhooks", args), "POST": ("create_webhook", args)}.get(method)
        args["webhook"] = rest[3]
        if n == 4 and method == "DELETE":
            return "delete_webhook", args
        if n == 5:
            return {("GET", "payloads"): ("webhook_payloads", args),
                    ("POST", "refresh"): ("refresh_webhook", args),
                    ("POST", "enableNotifications"): ("enable_notifications", args)}.get((method, rest[4]))
        return None
    if n == 2 and method == "GET" and rest[1]:
        return "list_records", {"base": rest[0], "table": rest[1]}
    if n == 3 and method == "POST" and rest[2] == "listRecords":
        return "list_records", {"base": rest[0], "table": rest[1], "post": True}
    if n == 3 and method == "GET" and REC_ID_RE.match(rest[2]):
        return "get_record", {"base": rest[0], "table": rest[1], "record": rest[2]}
    return None


def classify(method, segs):
    """Endpoint label for /__admin/stats."""
    if segs[:2] == ["oauth2", "v1"]:
        return "oauth_" + (segs[2] if len(segs) > 2 else "other")
    if segs and segs[0] == "v0" and len(segs) > 1:
        route = match_route(method, segs[1:])
        if route:
            return route[0]
    return "other"


def validate_webhook_request(payload, base):
    """Check a create-webhook body; returns the specification to store."""
    if not isinstance(payload, dict) or any(k not in ("notificationUrl", "specification") for k in payload):
        raise invalid_request()
    url = payload.get("notificationUrl")
    if url is not None and (not isinstance(url, str) or not re.match(r"^https?://", url)):
        raise invalid_request("notificationUrl must be an http(s) URL or null")
    spec = payload.get("specification")
    opts = spec.get("options") if isinstance(spec, dict) else None
    filters = opts.get("filters") if isinstance(opts, dict) else None
    if not isinstance(filters, dict):
        raise invalid_request("specification.options.filters is required")
    types = filters.get("dataTypes")
    if not isinstance(types, list) or not types or any(t not in ("tableData", "tableFields", "tableMetadata")
                                                       for t in types):
        raise invalid_request("filters.dataTypes must be a non-empty subset of tableData, tableFields, "
                              "tableMetadata")
    scope = filters.get("recordChangeScope")
    if scope is not None and not (isinstance(scope, str) and scope.startswith("tbl") and base.table(scope)):
        raise invalid_request("filters.recordChangeScope must be a table id of this base")
    for key in ("changeTypes",):
        if key in filters and (not isinstance(filters[key], list) or
                               any(c not in ("add", "remove", "update") for c in filters[key])):
            raise invalid_request()
    includes = opts.get("includes", {})
    if not isinstance(includes, dict):
        raise invalid_request()
    return json.loads(json.dumps(spec))


def default_error_body(status):
    """What Airtable sends for a given status when a fault has no explicit body."""
    table = {
        400: {"error": {"type": "INVALID_REQUEST_BODY", "message": "Could not parse request body"}},
        401: {"error": {"type": "AUTHENTICATION_REQUIRED", "message": "Authentication required"}},
        403: model_not_found().body,
        404: {"error": "NOT_FOUND"},
        413: {"error": {"type": "REQUEST_TOO_LARGE", "message": "Request body is too large"}},
        422: invalid_request().body,
        429: rate_limited().body,
        500: {"error": {"type": "SERVER_ERROR", "message": "Server error"}},
        502: {"error": {"type": "BAD_GATEWAY", "message": "Bad gateway"}},
        503: {"error": {"type": "SERVICE_UNAVAILABLE", "message": "Service unavailable"}},
    }
    return table.get(status, {"error": {"type": "SERVER_ERROR", "message": "HTTP %d" % status}})


# ----------------------------------------------------------------------------
# Admin API
# ----------------------------------------------------------------------------

def admin_base(w, key):
    base = w.base(key)
    if base is None:
        raise AdminError(404, "no base %s" % key)
    return base


def admin_table(w, base_key, table_key):
    base = admin_base(w, base_key)
    table = base.table(table_key)
    if table is None:
        raise AdminError(404, "no table %r in base %s" % (table_key, base.id))
    return base, table


def admin_field(table, key):
    f = table.field(key)
    if f is None:
        raise AdminError(404, "no field %r in table %s" % (key, table.name))
    return f


def pick_records(table, payload):
    """Records named by {ids: [...]} or the first {count: N} in creation order."""
    ids, count = payload.get("ids"), payload.get("count")
    if (ids is None) == (count is None):
        raise AdminError(400, "give exactly one of ids or count")
    if ids is not None:
        missing = [i for i in ids if i not in table.records]
        if missing:
            raise AdminError(404, "no record %s" % missing[0])
        return [table.records[i] for i in ids]
    return list(table.records.values())[:int(count)]


def admin_route(w, method, parts, params, payload):
    """Dispatch /__admin/...; returns (status, JSON-able result)."""
    head = parts[0] if parts else ""
    n = len(parts)
    if (method, head) == ("GET", ""):
        return 200, dict(ADMIN_HELP, pat=w.cfg.pat, refresh_token=w.cfg.refresh_token,
                         bases=[b.id for b in w.bases])
    if head in ("bases", "schema", "tables", "fields"):
        return admin_schema(w, method, parts, params, payload)
    if head in ("records", "bulk_create", "bulk_update", "bulk_delete"):
        return admin_records(w, method, parts, params, payload)
    if head in ("oauth", "pats", "expire_tokens"):
        return admin_auth(w, method, parts, payload)
    if (method, head) == ("POST", "expire_offsets"):
        count = len(w.iterators)
        w.iterators.clear()
        return 200, {"expired": count}
    if (method, head) == ("POST", "rate_limits"):
        return 200, admin_rate_limits(w, payload)
    if head in ("webhooks", "webhook_deliveries"):
        return admin_webhooks(w, method, parts, payload)
    if head == "faults":
        return admin_faults(w, method, payload)
    if head == "requests":
        if method == "DELETE":
            cleared = len(w.request_log)
            w.request_log = []
            return 200, {"cleared": cleared}
        if method == "GET":
            return 200, list(w.request_log)
    if (method, head) == ("GET", "stats"):
        return 200, {"requests": dict(w.endpoint_counts), "total_requests": sum(w.endpoint_counts.values()),
                     "rate_limited": w.rate_limited, "monthly_used": w.monthly_used,
                     "offsets": len(w.iterators), "access_tokens": len(w.access_tokens),
                     "webhooks": sum(len(b.webhooks) for b in w.bases),
                     "records": {b.id: {t.name: len(t.records) for t in b.tables} for b in w.bases}}
    if (method, head) == ("POST", "clock"):
        if "now" in payload:
            w.clock_offset = (admin_dt(payload["now"]) - datetime.now(UTC)).total_seconds()
        elif "offset" in payload:
            w.clock_offset = float(payload["offset"])
        elif "advance" in payload:
            w.clock_offset += float(payload["advance"])
        return 200, {"now": fmt_ts(w.now()), "offset": w.clock_offset}
    if (method, head) == ("POST", "reset"):
        cfg = w.cfg
        w.seed_world(int(payload.get("bases", cfg.bases)), int(payload.get("tables", cfg.tables)),
                     int(payload.get("records", cfg.records)), int(payload.get("seed", cfg.seed)))
        w.faults, w.request_log, w.endpoint_counts, w.rate_limited = [], [], {}, 0
        w.clock_offset, w.monthly_used, w.windows, w.penalty_until = 0.0, 0, {}, {}
        w.rate = {"per_base": cfg.rate_limit, "per_token": cfg.token_rate_limit, "penalty": cfg.penalty,
                  "penalty_extends": cfg.penalty_extends, "monthly_limit": cfg.monthly_limit}
        w.reset_oauth()
        w.webhook_sender.reset()
        return 200, {"bases": admin_bases_summary(w)}
    raise AdminError(404, "no admin endpoint %s /__admin/%s" % (method, "/".join(parts)))


def admin_bases_summary(w):
    return [{"id": b.id, "name": b.name,
             "tables": [{"id": t.id, "name": t.name, "records": len(t.records)} for t in b.tables]}
            for b in w.bases]


def admin_schema(w, method, parts, params, payload):
    head, n = parts[0], len(parts)
    if head == "bases":
        if method == "GET" and n == 1:
            return 200, admin_bases_summary(w)
        if method == "POST" and n == 1:
            base = w.seed_base(payload.get("name") or "Base %d" % (len(w.bases) + 1),
                               int(payload.get("tables", w.cfg.tables)), int(payload.get("records", 0)),
                               random.Random(w.seed * 1000 + len(w.bases)))
            return 201, [s for s in admin_bases_summary(w) if s["id"] == base.id][0]
    if head == "schema" and method == "GET" and n == 2:
        return 200, {"tables": [t.meta() for t in admin_base(w, parts[1]).tables]}
    if head == "tables" and n >= 2:
        base = admin_base(w, parts[1])
        if method == "POST" and n == 2:
            return 201, admin_create_table(w, base, payload, params)
        table = base.table(parts[2]) if n == 3 else None
        if table is None:
            raise AdminError(404, "no such table")
        tx = Transaction(w, base, params.get("source", "client"))
        if method == "PATCH":
            previous = {"name": table.name, "description": table.description}
            table.name = payload.get("name", table.name)
            table.description = payload.get("description", table.description)
            tx.metadata_changed(table, {"name": table.name, "description": table.description}, previous)
            tx.commit()
            return 200, table.meta()
        if method == "DELETE":
            w.remove_table(base, table, tx)
            tx.commit()
            return 200, {"removed": table.id}
    if head == "fields" and n >= 3:
        base, table = admin_table(w, parts[1], parts[2])
        tx = Transaction(w, base, params.get("source", "client"))
        if method == "POST" and n == 3:
            f = w.add_field_to(base, table, payload)
            tx.field_created(table, f)
            tx.commit()
            return 201, f.meta()
        f = admin_field(table, parts[3]) if n == 4 else None
        if f is not None and method == "PATCH":
            return 200, admin_patch_field(w, base, table, f, payload, tx)
        if f is not None and method == "DELETE":
            w.remove_field(base, table, f, tx)
            tx.commit()
            return 200, {"removed": f.id}
    raise AdminError(404, "no admin endpoint %s /__admin/%s" % (method, "/".join(parts)))


def admin_create_table(w, base, payload, params):
    name = payload.get("name")
    if not name or base.table(name):
        raise AdminError(422, "table name missing or taken")
    specs = payload.get("fields") or [{"name": "Name", "type": "singleLineText"}]
    if specs[0].get("type") in COMPUTED_TYPES | {"multipleRecordLinks", "multipleAttachments", "checkbox"}:
        raise AdminError(422, "the primary field cannot be of type %s" % specs[0].get("type"))
    table = w.build_table(base, name, specs)
    table.description = payload.get("description")
    tx = Transaction(w, base, params.get("source", "client"))
    tx.table_created(table)
    tx.commit()
    return table.meta()


def admin_patch_field(w, base, table, f, payload, tx):
    """Rename / describe / retype a field (retyping converts values to text or drops them)."""
    previous, current = {}, {}
    if "name" in payload and payload["name"] != f.name:
        if table.field_by_name(payload["name"]):
            raise AdminError(422, "duplicate field name")
        previous["name"], current["name"] = f.name, payload["name"]
        f.name = payload["name"]
    if "description" in payload:
        f.description = payload["description"]
    if "type" in payload and payload["type"] != f.type:
        new_type = payload["type"]
        if f.computed or new_type not in TEXT_TYPES | {"number"}:
            raise AdminError(422, "only non-computed fields can be retyped, to text types or number")
        for r in table.records.values():
            if f.id in r.cells:
                v = w.formula_input(table, f, r)
                if new_type == "number":
                    try:
                        r.cells[f.id] = f_number(v)
                    except FormulaEvalError:
                        r.cells.pop(f.id)
                else:
                    r.cells[f.id] = f_text(v)
        previous["type"], current["type"] = f.type, new_type
        f.type = new_type
        f.options = {"precision": 0} if new_type == "number" else None
    if "options" in payload and isinstance(payload["options"], dict) and f.options is not None:
        f.options.update(payload["options"])
    w.schema_gen += 1
    if current:
        tx.field_changed(table, f, current, previous)
        tx.commit()
    return f.meta()


def admin_records(w, method, parts, params, payload):
    head, n = parts[0], len(parts)
    if n < 3:
        raise AdminError(404, "want /__admin/%s/{base}/{table}" % head)
    base, table = admin_table(w, parts[1], parts[2])
    by_id = params.get("by", "id") != "name"
    at = admin_dt(params["at"]) if params.get("at") else None
    tx = Transaction(w, base, params.get("source", "client"))
    if head == "records":
        if method == "GET" and n == 3:
            return 200, [w.record_view(table, r, by_id) for r in table.records.values()]
        if method == "POST" and n == 3:
            created = admin_dt(payload["createdTime"]) if payload.get("createdTime") else None
            if "records" in payload:
                recs = [w.create_record(base, table, r.get("fields", {}), tx, at, created)
                        for r in payload["records"]]
                tx.commit()
                return 201, [w.record_view(table, r, by_id) for r in recs]
            rec = w.create_record(base, table, payload.get("fields", {}), tx, at, created)
            tx.commit()
            return 201, w.record_view(table, rec, by_id)
        rec = table.records.get(parts[3]) if n == 4 else None
        if rec is None:
            raise AdminError(404, "no record %s in table %s" % (parts[3] if n == 4 else "?", table.name))
        if method == "GET":
            return 200, w.record_view(table, rec, by_id)
        if method == "PATCH":
            w.update_record(base, table, rec, payload.get("fields", {}), tx, at)
            tx.commit()
            return 200, w.record_view(table, rec, by_id)
        if method == "DELETE":
            w.delete_record(table, rec.id, tx)
            tx.commit()
            return 200, {"id": rec.id, "deleted": True}
    if head == "bulk_create" and method == "POST":
        count = int(payload.get("count", 0))
        rng = random.Random(w.write_gen * 7 + count)
        stamp = at or w.stamp()
        ids = []
        for i in range(count):
            values = payload.get("fields")
            if values is None:
                values = {}
                for f in table.fields:
                    if not f.computed:
                        v = w.random_value(base, table, f, rng, len(table.records) + i)
                        if v is not None:
                            values[f.id] = admin_input_form(w, f, v)
            ids.append(w.create_record(base, table, values, tx, stamp).id)
        tx.commit()
        return 201, {"ids": ids, "createdTime": fmt_ts(stamp)}
    if head == "bulk_update" and method == "POST":
        recs = pick_records(table, payload)
        stamp = at or w.stamp()
        for r in recs:
            w.update_record(base, table, r, payload.get("fields") or {}, tx, stamp)
        tx.commit()
        return 200, {"ids": [r.id for r in recs], "lastModifiedTime": fmt_ts(stamp)}
    if head == "bulk_delete" and method == "POST":
        recs = pick_records(table, payload)
        for r in recs:
            w.delete_record(table, r.id, tx)
        tx.commit()
        return 200, {"ids": [r.id for r in recs]}
    raise AdminError(404, "no admin endpoint %s /__admin/%s" % (method, "/".join(parts)))


def admin_input_form(w, f, stored):
    """A stored seed value converted back to what coerce_value() accepts."""
    if f.type == "singleSelect":
        return f.choice_by_id(stored)["name"]
    if f.type == "multipleSelects":
        return [f.choice_by_id(c)["name"] for c in stored]
    if f.type == "dateTime":
        return fmt_ts(stored)
    if f.type == "multipleAttachments":
        return [{k: a[k] for k in ("filename", "type", "size", "width", "height") if k in a} for a in stored]
    return stored


def admin_auth(w, method, parts, payload):
    head = parts[0]
    if (method, head) == ("POST", "expire_tokens"):
        count = len(w.access_tokens)
        w.access_tokens.clear()
        return 200, {"expired": count}
    if head == "oauth":
        if method == "POST" and parts[1:] == ["grant"]:
            scopes = payload.get("scopes") or ALL_SCOPES
            if any(s not in ALL_SCOPES for s in scopes):
                raise AdminError(422, "unknown scope")
            return 201, w.new_grant(scopes, payload.get("refresh_token"))
        if method == "GET" and len(parts) == 1:
            return 200, {"grants": [
                {"id": g["id"], "revoked": g["revoked"], "scopes": g["scopes"],
                 "refresh_tokens": [{"token": t, "used": i["used"], "expires": fmt_ts(i["expires"])}
                                    for t, i in w.refresh_tokens.items() if i["grant"] == g["id"]],
                 "access_tokens": sum(1 for a in w.access_tokens.values() if a["grant"] == g["id"])}
                for g in w.grants.values()]}
    if head == "pats":
        if method == "POST" and len(parts) == 1:
            token = payload.get("token") or "pat%s.%s" % (
                "".join(w.token_rng.choice(BASE62) for _ in range(14)), secrets.token_hex(32))
            scopes = payload.get("scopes") or ALL_SCOPES
            w.add_pat(token, scopes, payload.get("bases"))
            return 201, {"token": token, "scopes": scopes, "bases": payload.get("bases")}
        if method == "DELETE" and len(parts) == 2:
            if w.pats.pop(parts[1], None) is None:
                raise AdminError(404, "no such PAT")
            return 200, {"removed": parts[1]}
    raise AdminError(404, "no admin endpoint %s /__admin/%s" % (method, "/".join(parts)))


def admin_rate_limits(w, payload):
    for key in ("per_base", "per_token", "monthly_limit"):
        if key in payload:
            w.rate[key] = int(payload[key] or 0)
    if "penalty" in payload:
        w.rate["penalty"] = float(payload["penalty"])
    if "penalty_extends" in payload:
        w.rate["penalty_extends"] = bool(payload["penalty_extends"])
    if "monthly_used" in payload:
        w.monthly_used = int(payload["monthly_used"])
    if payload.get("clear_penalties"):
        w.penalty_until.clear()
        w.windows.clear()
    now = w.now().timestamp()
    return dict(w.rate, monthly_used=w.monthly_used,
                penalties={k: round(v - now, 3) for k, v in w.penalty_until.items() if v > now})


def admin_webhooks(w, method, parts, payload):
    hooks = [h for b in w.bases for h in b.webhooks.values()]
    if method == "GET" and parts == ["webhooks"]:
        now = w.now()
        return 200, [{"id": h.id, "base": h.base.id, "enabled": h.enabled(now), "expirationTime": fmt_ts(h.expires),
                      "cursorForNextPayload": h.next_cursor, "payloads": len(h.payloads),
                      "notificationUrl": h.notification_url, "lastNotificationResult": h.last_result,
                      "macSecretBase64": base64.b64encode(h.mac_secret).decode()}
                     for h in hooks]
    if method == "GET" and parts[1:] == ["status"]:
        return 200, w.webhook_sender.status()
    shared = webhook_admin(w.webhook_sender, method, parts, payload, AdminError)
    if shared is not None:
        return shared
    if not isinstance(payload, dict):
        raise AdminError(400, "body must be a JSON object")
    wanted = payload.get("id", payload.get("webhook_id"))
    chosen = [h for h in hooks if wanted in (None, h.id)]
    if wanted and not chosen:
        raise AdminError(404, "no webhook %s" % wanted)
    if method == "POST" and parts[1:] == ["expire"]:
        for h in chosen:
            h.expires = w.now()
        return 200, {"expired": [h.id for h in chosen]}
    if method == "POST" and parts[1:] == ["purge_payloads"]:
        before = admin_dt(payload["before"]) if payload.get("before") else None
        purged = 0
        for h in chosen:
            keep = [p for p in h.payloads if before is not None and p[1] >= before]
            purged += len(h.payloads) - len(keep)
            h.payloads = keep
        return 200, {"purged": purged}
    raise AdminError(404, "no admin endpoint %s /__admin/%s" % (method, "/".join(parts)))


def admin_webhook_send(w, payload):
    """One crafted notification ping (tampered MAC, wrong secret...), sent now."""
    if not isinstance(payload, dict):
        raise AdminError(400, "body {webhook_id?, url?, body?, secret_base64?, mac?}")
    with w.lock:
        url, body, headers, ids = craft_ping(w, [h for b in w.bases for h in b.webhooks.values()], payload)
    status, text = w.webhook_sender.send_now(url, body, headers, ids)
    return {"status": status, "response_body": text, "headers": headers, "body": body.decode("utf-8", "replace")}


def craft_ping(w, hooks, payload):
    if payload.get("webhook_id"):
        hook = next((h for h in hooks if h.id == payload["webhook_id"]), None)
        if hook is None:
            raise AdminError(404, "no webhook %s" % payload["webhook_id"])
    else:
        hook = next((h for h in reversed(hooks) if h.notification_url), None)
    url = payload.get("url") or (hook.notification_url if hook else None)
    if not url:
        raise AdminError(400, "no url given and no webhook with a notificationUrl")
    if isinstance(payload.get("body"), str):
        body = payload["body"].encode()
    elif hook is not None:
        body = ping_body(w, hook)
    else:
        raise AdminError(400, "no body given and no webhook to make one for")
    if payload.get("secret_base64") is not None:
        try:
            secret = base64.b64decode(payload["secret_base64"], validate=True)
        except (TypeError, ValueError):
            raise AdminError(400, "secret_base64 must be base64")
    elif hook is not None:
        secret = hook.mac_secret
    elif payload.get("mac") is None:
        raise AdminError(400, "no secret_base64 or mac given and no webhook to take the secret from")
    else:
        secret = b""
    headers = ping_headers(secret, body, mac=payload.get("mac"))
    ids = {"webhook_id": hook.id, "base_id": hook.base.id} if hook is not None else {}
    return url, body, headers, ids


def admin_faults(w, method, payload):
    if method == "GET":
        return 200, w.faults
    if method == "DELETE":
        cleared = len(w.faults)
        w.faults = []
        return 200, {"cleared": cleared}
    if method != "POST":
        raise AdminError(405, "faults: GET, POST or DELETE")
    fault = make_fault(w.fault_seq + 1, payload, AdminError)
    w.fault_seq += 1
    w.faults.append(fault)
    return 201, {"id": fault["id"]}


# ----------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------

class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


DEFAULT_PAT = "patFakeToken00001." + hashlib.sha256(b"fake-airtable-pat").hexdigest()


def parse_args(argv):
    p = argparse.ArgumentParser(description="Fake Airtable Web API for sync's tests")
    p.add_argument("--port", type=int, default=0, help="0 = pick a free port (printed)")
    p.add_argument("--bases", type=int, default=1)
    p.add_argument("--tables", type=int, default=3, help="tables per base (1: Contacts only)")
    p.add_argument("--records", type=int, default=500, help="records seeded in each table")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--base-time", default="2025-03-01T00:00:00Z",
                   help="seeded times end before this ISO time ('now' = current hour)")
    p.add_argument("--pat", default=DEFAULT_PAT, help="personal access token accepted for every base")
    p.add_argument("--client-id", default="test-client")
    p.add_argument("--client-secret", default="", help="non-empty: token endpoint wants HTTP Basic auth")
    p.add_argument("--refresh-token", default="test-refresh", help="initial OAuth refresh token (single use)")
    p.add_argument("--redirect-uri", default="http://localhost/callback")
    p.add_argument("--access-token-lifetime", type=float, default=3600)
    p.add_argument("--refresh-token-lifetime", type=float, default=60 * 86400)
    p.add_argument("--refresh-reuse", choices=("revoke", "reject"), default="revoke",
                   help="replaying a used refresh token: revoke the whole grant, or only refuse")
    p.add_argument("--rotate-access-on-refresh", action="store_true",
                   help="a refresh also invalidates the grant's older access tokens")
    p.add_argument("--offset-ttl", type=float, default=300, help="iterator lifetime since last use, seconds")
    p.add_argument("--rate-limit", type=int, default=5, help="requests/second per base (0 = off)")
    p.add_argument("--token-rate-limit", type=int, default=50, help="requests/second per PAT owner (0 = off)")
    p.add_argument("--penalty", type=float, default=30, help="seconds of 429s after exceeding a limit")
    p.add_argument("--penalty-extends", action="store_true", help="requests during the penalty restart it")
    p.add_argument("--monthly-limit", type=int, default=0, help="calls per workspace per month (0 = unlimited)")
    p.add_argument("--webhook-ttl", type=float, default=7 * 86400)
    p.add_argument("--payload-retention", type=float, default=7 * 86400)
    p.add_argument("--ms-timestamps", action="store_true", help="write times keep milliseconds")
    p.add_argument("--verbose", action="store_true", help="log requests to stderr")
    cfg = p.parse_args(argv)
    if cfg.base_time == "now":
        cfg.base_time = None
    else:
        cfg.base_time = parse_dt(cfg.base_time)
        if cfg.base_time is None:
            p.error("--base-time must be ISO-8601, or 'now'")
    if cfg.bases < 1 or cfg.tables < 1 or cfg.records < 0:
        p.error("--bases and --tables must be >= 1, --records >= 0")
    return cfg


def main(argv=None):
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    world = World(cfg)
    Handler.world = world
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
