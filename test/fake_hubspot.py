#!/usr/bin/python3
"""Fake HubSpot CRM API for the `sync` test suite (Python 3.11, stdlib only).

Run:  /usr/bin/python3 test/fake_hubspot.py --port 0 [--contacts 1000] [--companies 100]
      [--deals 300] [--cars 50] [--archived 10] [--seed 1] [--base-time ISO|now]
      [--search-lag 5] [--token-lifetime 1800] [--burst-limit 190] [--oauth-burst-limit 110]
      [--daily-limit 625000] [--search-rate 5] [--private-app-token T] [--client-id ..]
      [--client-secret ..] [--refresh-token ..] [--portal-id N] [--verbose]
Prints "listening on PORT" once ready (stdout, flushed). Binds 127.0.0.1 only.

Imitates one HubSpot account (portal) as strictly as we know how:
  * auth: a static private-app token, and OAuth (POST /oauth/v1/token, refresh_token grant)
    whose access tokens expire (401 EXPIRED_AUTHENTICATION, "expired N second(s) ago");
  * CRM objects v3: contacts (0-1), companies (0-2), deals (0-3) and one custom object
    "cars" (2-1234567, p<portal>_cars): list (limit <= 100, `after` cursor, archived=true
    recycle bin of 90 days), read, batch read, create/update/archive, merge, search;
  * properties v3 and schemas v3 (also the 2026-03/2026-09 date-versioned paths);
  * associations v4 (read one record's, batch read) with typeId/category/label;
  * rate limits: per-10-second burst per app, daily per account (private app only),
    search 5 req/s per account; X-HubSpot-RateLimit-* headers (none on search responses);
  * HubSpot error bodies {status, message, correlationId, category[, context, errors]};
  * classic webhooks (POST /__admin/webhook_target): contact/company/deal creation,
    propertyChange, deletion, restore, merge and privacyDeletion events, batched (50 ms,
    <= 100 per POST), signed with X-HubSpot-Signature-v3, sent from a background thread and
    retried after 0.2/0.5/1 s (HubSpot: up to 10 times over 24 h; never after a 4xx but 429);
    deliveries can be held (dropped), are logged and can be crafted (/__admin/webhooks/*).

Every property value on the wire is a string or null (numbers "12.5", bools "true",
dates "2024-05-01", datetimes as Java's Instant.toString() prints them:
"2024-05-01T12:34:56.789Z", or "2024-05-01T00:00:00Z" when the milliseconds are zero,
multi-select "a;b;c").

Behaviour worth knowing (each is what the real API does, see the comments near the code):
  * Search sees an index that lags writes by --search-lag seconds (admin-settable):
    creates, updates, archives and merges reach search results only after the lag, and
    until then search returns the old values. The lag runs on the server clock, so
    POST /__admin/clock can also make pending writes visible.
  * Search: limit <= 200; at most 10,000 results reachable per query (after + limit >
    10000 -> 400, while paging.next is still offered); at most 5 filterGroups, 6 filters a
    group, 18 in total (the developer guide's numbers; the Aug 2024 changelog announced
    5/10/25 -- POST /__admin/search_limits switches); one sort; ties in the sort come back
    in an arbitrary (but stable) order, not by id; no sorts = by id. Archived records never
    appear. 5 searches per second per account, then 429 SECONDLY.
  * Contacts' change stamp is `lastmodifieddate`. Contacts also list an
    `hs_lastmodifieddate` property, but it is never populated: a search on it matches
    nothing (a known HubSpot trap). Other objects use `hs_lastmodifieddate`.
  * Archiving does not change the last-modified stamp. Association changes do not change
    either side's stamp, except that a contact's primary company is mirrored in its
    `associatedcompanyid` property (a property change, so it bumps the contact).
  * Merging (contacts, companies, deals, cars) creates a NEW record with a new id whose
    hs_merged_object_ids lists both old ids; reading an old id returns the new record;
    old ids are in neither the list nor the archived list.
  * Seeded contacts: with >= 300 contacts, 250 of them share one lastmodifieddate
    millisecond (a bulk import: more than one 200-record search page). Ids grow with
    gaps and cross digit-count boundaries (compare them as numbers, not strings).

/__admin/ is the test-control API (JSON in/out, no auth, not counted, not logged);
GET /__admin/ lists every endpoint with its shape (ADMIN_HELP below).
"""

import argparse
import base64
import bisect
import collections
import email.utils
import functools
import gzip
import hashlib
import hmac
import json
import random
import re
import socket
import sys
import threading
import time
import traceback
import uuid
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit

from fakelib import (FAULT_HELP, WEBHOOK_ADMIN_HELP, Debouncer, FaultDelivery, WebhookSender,
                     fault_on_real_answer, fault_pick, make_fault, webhook_admin)

UTC = timezone.utc
JSON_TYPE = "application/json;charset=utf-8"
LIST_MAX_LIMIT = 100            # GET /crm/v3/objects/{type}
SEARCH_MAX_LIMIT = 200          # raised from 100 in 2024
SEARCH_DEFAULT_LIMIT = 10
SEARCH_RESULT_CAP = 10000       # results reachable by paging one search query
BATCH_READ_MAX = 100
ASSOC_BATCH_MAX = 1000
ASSOC_PAGE_MAX = 500
RECYCLE_BIN_DAYS = 90
MAX_URI_BYTES = 16384
DATE_VERSIONS = ("2026-03", "2026-09")
BURST_WINDOW = 10.0             # seconds: X-HubSpot-RateLimit-Interval-Milliseconds 10000
WEBHOOK_OBJECTS = {"contacts": "contact", "companies": "company", "deals": "deal"}   # no custom objects
WEBHOOK_KINDS = ("creation", "propertyChange", "deletion", "restore", "merge", "privacyDeletion")
WEBHOOK_BATCH_WINDOW = 0.05     # seconds: changes this close together go out in one POST
WEBHOOK_MAX_BATCH = 100         # HubSpot sends at most 100 events per request
WEBHOOK_APP_ID = 54321
WEBHOOK_FIRST_EVENT_ID = 1000000001
WEBHOOK_FIRST_SUBSCRIPTION_ID = 2000001
# Escapes HubSpot decodes in the URI it signs (v3), per "Validating requests" in its docs.
V3_URI_DECODE = {"%3A": ":", "%2F": "/", "%3F": "?", "%40": "@", "%21": "!", "%24": "$", "%27": "'",
                 "%28": "(", "%29": ")", "%2A": "*", "%2C": ",", "%3B": ";"}

ADMIN_HELP = {
    "POST /__admin/records/{type}": "body {properties: {name: value}, at?: ISO} -> 201 record "
                                    "(server sets id, createdate, last-modified = at or now)",
    "GET /__admin/records/{type}[?archived=1|all=1]": "-> [record, ...] live (or archived, or "
                                                      "everything incl. merged) sorted by id",
    "GET /__admin/records/{type}/{id}": "-> record (any state; merged ones show mergedInto)",
    "PATCH /__admin/records/{type}/{id}[?bump=0]": "body {properties: {...}, at?: ISO} -> record; "
                                                   "bump=0 keeps the last-modified stamp",
    "DELETE /__admin/records/{type}/{id}[?hard=1]": "archive (recycle bin) or purge for good "
                                                    "(GDPR delete) -> {id, archived, archivedAt, hard}",
    "POST /__admin/restore/{type}/{id}": "-> record (out of the recycle bin; stamp unchanged)",
    "POST /__admin/merge/{type}": "body {primaryObjectId, objectIdToMerge} -> the new record",
    "POST /__admin/bulk_update/{type}": "body {ids: [...] | count: N, properties: {...}, at?: ISO} "
                                        "-> {ids, lastmodified, epochMs}: all in one millisecond",
    "PUT /__admin/associations": "body {fromType, fromId, toType, toId, typeId?} -> {from, to, types}"
                                 " (typeId defaults to the unlabeled type)",
    "DELETE /__admin/associations": "body {fromType, fromId, toType, toId, typeId?} -> {from, to, types}",
    "GET /__admin/associations/{fromType}/{id}/{toType}": "-> [{toObjectId, typeIds}] (truth)",
    "GET /__admin/association_types": "-> [{typeId, fromType, toType, category, label, inverse}]",
    "POST /__admin/search_lag": "body {seconds} -> {seconds}",
    "POST /__admin/flush_index": "-> {flushed: N}: every pending write becomes searchable now",
    "POST /__admin/search_limits": "body {max_groups?, max_filters_per_group?, max_filters_total?} -> limits",
    "GET /__admin/dump": "-> {now, objects: {type: [record...]}, associations: [...]} (truth)",
    "POST /__admin/properties/{type}": "body {name, type, fieldType, label?, options?: [value...]} -> property",
    "DELETE /__admin/properties/{type}/{name}": "-> {archived: name}",
    "POST /__admin/expire_tokens": "-> {expired: N} (OAuth access tokens now answer EXPIRED_AUTHENTICATION)",
    "POST /__admin/token_lifetime": "body {seconds} -> {seconds} (for tokens issued from now on)",
    "POST /__admin/limits": "body {daily_used?, daily_max?, burst_max?, oauth_burst_max?, search_per_second?, "
                            "tz_offset_minutes?, reset_windows?} -> current limits",
    "GET /__admin/stats": "-> {requests: {endpoint: n}, usage, records, archived, pending_index, ...}",
    "POST /__admin/faults": FAULT_HELP,
    "GET /__admin/faults": "-> [fault, ...]",
    "DELETE /__admin/faults": "-> {cleared: N}",
    "GET /__admin/requests": "-> [{t, method, path, query, status, body?}] (body: parsed JSON of API POSTs)",
    "DELETE /__admin/requests": "-> {cleared: N}",
    "POST /__admin/clock": "body {offset: seconds} or {now: ISO} -> {now, offset}",
    "POST /__admin/reset": "body {contacts?, companies?, deals?, cars?, archived?, seed?} -> {records: {...}} "
                           "(also removes the webhook target, releases a hold, clears the delivery log)",
    "POST /__admin/webhook_target":
        "body {url, client_secret? (default --client-secret), max_batch?: 1..100 (default 100), "
        "subscription_types?: ['contact.creation', ...] (default all), property_names?: [name, ...] "
        "(propertyChange only for these; default every property)} -> the target. One target per app",
    "GET /__admin/webhook_target": "-> the target, or null",
    "DELETE /__admin/webhook_target": "-> {deleted: true|false}",
    "(deliveries)":
        "each change of a contact, company or deal (admin or public API; the custom object has none) "
        "becomes events: {objectType}.creation, .propertyChange (one per changed property, propertyName, "
        "propertyValue as the API shows it, '' for a cleared value; the stamps lastmodifieddate / "
        "hs_lastmodifieddate change too), .deletion (archive), .restore, .merge (objectId = the new "
        "record, primaryObjectId, mergedObjectIds, newObjectId, numberOfPropertiesMoved), and for a hard "
        "delete contact.privacyDeletion (others: .deletion). Event fields: eventId (int, unique), "
        "subscriptionId (int per subscriptionType), portalId, appId (54321), occurredAt (ms, fake clock: "
        "the record's new stamp / archivedAt), subscriptionType, attemptNumber (0-based), objectId (int), "
        "changeSource ('CRM_UI' admin, 'API' public API, 'CALCULATED' admin PATCH ?bump=0), changeFlag "
        "(creation NEW, deletion and privacyDeletion DELETED, merge MERGED). Events within 50 ms (up to max_batch) are POSTed as one "
        "JSON array to url with Content-Type: application/json, X-HubSpot-Signature-v3: base64(HMAC-SHA256("
        "key = client_secret, msg = 'POST' + uri + body + timestamp)), X-HubSpot-Request-Timestamp: <ms, "
        "wall clock>, and the legacy X-HubSpot-Signature: hex SHA-256(client_secret + body) with "
        "X-HubSpot-Signature-Version: v1 (what HubSpot sends for CRM webhooks). uri = the target url as "
        "configured, with %3A %2F %3F %40 %21 %24 %27 %28 %29 %2A %2C %3B decoded. A failed delivery is "
        "retried (same eventIds, attemptNumber + 1, new timestamp) unless the answer was 4xx other than "
        "429 (HubSpot does not retry those; it retries up to 10 times over 24 h). Log ids: event_ids",
    "POST /__admin/webhooks/send":
        "body {url?, client_secret?, body?: raw string, events?: [event, ...], timestamp?: ms, "
        "signature?: X-HubSpot-Signature-v3 value, method?: 'POST'} -> {status, response_body, headers, "
        "body}: one crafted delivery sent now (not retried, logged with crafted: true); url/client_secret "
        "default to the target's; the body to `body`, else `events` encoded, else one made-up "
        "contact.propertyChange",
}
ADMIN_HELP.update(WEBHOOK_ADMIN_HELP)


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------

def correlation_id():
    return str(uuid.uuid4())


class ApiError(Exception):
    """A HubSpot API error: {status: "error", message, correlationId, category, ...}."""

    def __init__(self, status, category, message, context=None, errors=None, headers=None,
                 sub_category=None):
        super().__init__(message)
        self.status = status
        self.body = {"status": "error", "message": message, "correlationId": correlation_id(),
                     "category": category}
        if sub_category:
            self.body["subCategory"] = sub_category
        if context:
            self.body["context"] = context
        if errors:
            self.body["errors"] = errors
        self.headers = headers or {}


class RateLimitError(Exception):
    """429: rate-limit bodies carry errorType/policyName instead of category."""

    def __init__(self, policy, headers=None):
        names = {"TEN_SECONDLY_ROLLING": "ten_secondly_rolling", "DAILY": "daily",
                 "SECONDLY": "secondly"}
        super().__init__(policy)
        self.status = 429
        self.body = rate_limit_body(names[policy], policy)
        self.headers = headers or {}


def rate_limit_body(name, policy):
    return {"status": "error", "message": "You have reached your %s limit." % name,
            "errorType": "RATE_LIMIT", "correlationId": correlation_id(),
            "policyName": policy, "requestId": uuid.uuid4().hex}


class OAuthError(Exception):
    """/oauth/v1/token errors: {status: BAD_..., message, correlationId} (no category)."""

    def __init__(self, status_word, message):
        super().__init__(message)
        self.status = 400
        self.body = {"status": status_word, "message": message, "correlationId": correlation_id()}


class AdminError(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def bad_request(message="There was a problem with the request.", **kw):
    return ApiError(400, "VALIDATION_ERROR", message, **kw)


def unknown_object_type(name):
    # What HubSpot answers for /crm/v3/objects/foo and /crm/v3/properties/foo.
    return ApiError(400, "VALIDATION_ERROR", "Unable to infer object type from: %s" % name)


def object_not_found(object_id):
    return ApiError(404, "OBJECT_NOT_FOUND", "Object not found.  objectId are usually numeric.",
                    context={"id": [str(object_id)]})


def resource_not_found():
    return ApiError(404, "OBJECT_NOT_FOUND", "resource not found")


def method_not_allowed(method):
    return ApiError(405, "VALIDATION_ERROR", "HTTP %s is not supported by this endpoint" % method)


INVALID_AUTH_MESSAGE = ("Authentication credentials not found. This API supports OAuth 2.0 "
                        "authentication and you can find more details at "
                        "https://developers.hubspot.com/docs/methods/auth/oauth-overview")


def invalid_auth():
    return ApiError(401, "INVALID_AUTHENTICATION", INVALID_AUTH_MESSAGE)


def expired_auth(expired_at, now):
    """The 401 for an expired OAuth token, with HubSpot's coarse "N unit(s) ago"."""
    ago = max(0, int((now - expired_at).total_seconds()))
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if ago >= size:
            amount = "%d %s(s)" % (ago // size, unit)
            break
    else:
        amount = "%d second(s)" % ago
    return ApiError(401, "EXPIRED_AUTHENTICATION",
                    "The OAuth token used to make this call expired %s ago." % amount,
                    context={"expire time": [fmt_instant(expired_at)]})


# ----------------------------------------------------------------------------
# Time and value formats (everything is UTC)
# ----------------------------------------------------------------------------

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def fmt_instant(dt):
    """Java Instant.toString(): milliseconds when non-zero, none at all when zero."""
    ms = dt.microsecond // 1000
    base = dt.strftime("%Y-%m-%dT%H:%M:%S")
    return base + ("Z" if ms == 0 else ".%03dZ" % ms)


def to_ms(dt):
    return (dt - EPOCH) // timedelta(milliseconds=1)


def from_ms(ms):
    return EPOCH + timedelta(milliseconds=int(ms))


def trunc_ms(dt):
    return dt.replace(microsecond=dt.microsecond // 1000 * 1000)


ISO_RE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?"
                    r"(Z|[+-]\d{2}:?\d{2})$")
DATE_RE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")
MS_RE = re.compile(r"^-?\d{1,15}$")


def parse_iso(text):
    """ISO-8601 datetime with an explicit zone -> aware datetime, or None."""
    m = ISO_RE.match(text or "")
    if not m:
        return None
    y, mo, d, h, mi, s, frac, zone = m.groups()
    try:
        dt = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s or 0),
                      int((frac or "0").ljust(6, "0")[:6]), tzinfo=UTC)
    except ValueError:
        return None
    if zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        digits = zone[1:].replace(":", "")
        dt -= sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
    return dt


def parse_date(text):
    m = DATE_RE.match(text or "")
    if not m:
        return None
    try:
        return date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    except ValueError:
        return None


def parse_instant(value):
    """A datetime as clients send it: epoch ms (string or number), ISO, or a bare date
    (midnight UTC). None when it is none of these."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return from_ms(int(value))
    text = str(value).strip()
    if MS_RE.match(text):
        return from_ms(int(text))
    dt = parse_iso(text)
    if dt is None:
        d = parse_date(text)
        if d is not None:
            dt = datetime(d.year, d.month, d.day, tzinfo=UTC)
    return trunc_ms(dt) if dt else None


def parse_admin_dt(text):
    dt = parse_instant(text) if text is not None else None
    if dt is None:
        raise AdminError(400, "bad datetime %r (want ISO like 2024-05-01T12:00:00Z or epoch ms)" % (text,))
    return dt


def fmt_number(value):
    """Canonical decimal text: "12.5", "100", never exponent form."""
    d = Decimal(value)
    if not d.is_finite():
        raise InvalidOperation
    text = format(d.normalize(), "f")
    return "0" if text in ("-0", "") else text


# ----------------------------------------------------------------------------
# Schema: properties and object types
# ----------------------------------------------------------------------------

TYPES = ("string", "number", "bool", "enumeration", "date", "datetime", "phone_number")
FIELD_TYPES = {"string": ("text", "textarea", "phonenumber", "html", "file"),
               "phone_number": ("phonenumber",),
               "number": ("number", "calculation_equation"),
               "bool": ("booleancheckbox", "calculation_equation"),
               "enumeration": ("select", "radio", "checkbox", "booleancheckbox"),
               "date": ("date",), "datetime": ("date",)}
DEFINED_AT = datetime(2019, 8, 6, 2, 41, 8, 29000, tzinfo=UTC)


class Prop:
    """One CRM property: metadata for the properties API plus validation of values."""

    def __init__(self, name, ptype, field_type, label=None, group="information", options=None,
                 calculated=False, read_only=False, unique=False, hubspot_defined=True,
                 sensitive=False, description="", display_order=-1, created=None):
        assert ptype in TYPES and field_type in FIELD_TYPES[ptype], (name, ptype, field_type)
        self.name = name
        self.type = ptype
        self.field_type = field_type
        self.label = label or name.replace("_", " ").capitalize()
        self.group = group
        # options: [(value, label)]; HubSpot keeps internal values apart from labels.
        self.options = [(o, o) if isinstance(o, str) else tuple(o) for o in (options or [])]
        self.calculated = calculated
        self.read_only = read_only or calculated
        self.unique = unique
        self.hubspot_defined = hubspot_defined
        self.sensitive = sensitive
        self.description = description
        self.display_order = display_order
        self.created = created or DEFINED_AT
        self.archived_at = None

    @property
    def multi(self):
        return self.type == "enumeration" and self.field_type == "checkbox"

    def describe(self):
        d = {
            "updatedAt": fmt_instant(self.created), "createdAt": fmt_instant(self.created),
            "name": self.name, "label": self.label, "type": self.type,
            "fieldType": self.field_type, "description": self.description,
            "groupName": self.group,
            "options": [{"label": lab, "value": val, "displayOrder": i, "hidden": False}
                        for i, (val, lab) in enumerate(self.options)],
            "displayOrder": self.display_order, "calculated": self.calculated,
            "externalOptions": False, "hasUniqueValue": self.unique, "hidden": False,
            "hubspotDefined": self.hubspot_defined,
            "modificationMetadata": {"archivable": not self.hubspot_defined,
                                     "readOnlyDefinition": self.hubspot_defined,
                                     "readOnlyValue": self.read_only},
            "formField": not self.read_only,
            "dataSensitivity": "sensitive" if self.sensitive else "non_sensitive",
            "archived": self.archived_at is not None,
        }
        if self.archived_at is not None:
            d["archivedAt"] = fmt_instant(self.archived_at)
        return d

    def normalize(self, raw):
        """Wire string for a written value; None clears. Raises ValueError(code, message)."""
        if raw is None or raw == "":
            return None
        if self.type in ("string", "phone_number"):
            return raw if isinstance(raw, str) else json.dumps(raw) if isinstance(raw, (list, dict)) else str(raw)
        if self.type == "number":
            try:
                return fmt_number(str(raw) if not isinstance(raw, bool) else "x")
            except (InvalidOperation, ValueError):
                raise ValueError("INVALID_NUMBER", "%r was not a valid number." % (raw,))
        if self.type == "bool":
            text = str(raw).lower()
            if text not in ("true", "false"):
                raise ValueError("INVALID_BOOLEAN", "%r is not a valid boolean." % (raw,))
            return text
        if self.type == "date":
            dt = parse_instant(raw)
            if dt is None or (dt.hour, dt.minute, dt.second, dt.microsecond) != (0, 0, 0, 0):
                raise ValueError("INVALID_DATE", "%r is not a valid date: use YYYY-MM-DD or "
                                 "midnight UTC in epoch milliseconds." % (raw,))
            return dt.date().isoformat()
        if self.type == "datetime":
            dt = parse_instant(raw)
            if dt is None:
                raise ValueError("INVALID_DATETIME", "%r is not a valid datetime." % (raw,))
            return fmt_instant(dt)
        return self.normalize_enum(raw)

    def normalize_enum(self, raw):
        values = raw if isinstance(raw, list) else str(raw).split(";") if self.multi else [str(raw)]
        allowed = {v for v, _ in self.options}
        cleaned = [str(v) for v in values if str(v) != ""]
        if not self.multi and len(cleaned) != 1:
            raise ValueError("INVALID_OPTION", "%r is not one option." % (raw,))
        for v in cleaned:
            if allowed and v not in allowed:
                raise ValueError("INVALID_OPTION", "%s was not one of the allowed options: [%s]"
                                 % (v, ", ".join(sorted(allowed))))
        return ";".join(cleaned) if cleaned else None


class ObjectType:
    """One CRM object type: its ids, names and properties."""

    def __init__(self, name, type_id, singular, plural, props, defaults, search_text,
                 created_prop="createdate", lastmod_prop="hs_lastmodifieddate", custom=False,
                 fqn=None, first_id=1, primary_display="name"):
        self.name = name                    # canonical URL name: contacts, companies, deals, p_cars
        self.type_id = type_id
        self.singular = singular
        self.plural = plural
        self.props = collections.OrderedDict((p.name, p) for p in props)
        self.defaults = defaults            # properties returned when none are asked for
        self.search_text = search_text      # properties the search `query` looks at
        self.created_prop = created_prop
        self.lastmod_prop = lastmod_prop
        self.custom = custom
        self.fqn = fqn
        self.first_id = first_id
        self.primary_display = primary_display
        self.schema_created = datetime(2023, 2, 1, 10, 0, 0, 123000, tzinfo=UTC)

    def live_prop(self, name):
        p = self.props.get(name)
        return p if p is not None and p.archived_at is None else None

    def always(self):
        """Properties every response carries, asked for or not."""
        return ["hs_object_id", self.created_prop, self.lastmod_prop]


def P(*args, **kw):
    return Prop(*args, **kw)


def system_props(created_prop, lastmod_prop, extra_lastmod=None):
    """hs_object_id, create/modify stamps and hs_merged_object_ids (read-only everywhere)."""
    props = [P("hs_object_id", "number", "number", "Record ID", read_only=True),
             P(created_prop, "datetime", "date", "Create Date", read_only=True),
             P(lastmod_prop, "datetime", "date", "Last Modified Date", read_only=True),
             P("hs_merged_object_ids", "enumeration", "checkbox", "Merged record IDs", read_only=True)]
    if extra_lastmod:
        props.append(P(extra_lastmod, "datetime", "date", "Object last modified date/time", read_only=True))
    return props


LIFECYCLE = ["subscriber", "lead", "marketingqualifiedlead", "salesqualifiedlead", "opportunity",
             "customer", "evangelist", "other"]
LEAD_STATUS = ["NEW", "OPEN", "IN_PROGRESS", "OPEN_DEAL", "UNQUALIFIED", "ATTEMPTED_TO_CONTACT",
               "CONNECTED", "BAD_TIMING"]
INTERESTS = [("sports", "Sports"), ("music", "Music"), ("travel", "Travel"),
             ("food_wine", "Food & Wine"), ("technology", "Technology"), ("art", "Art")]
INDUSTRIES = ["COMPUTER_SOFTWARE", "FINANCIAL_SERVICES", "HOSPITAL_HEALTH_CARE", "RETAIL",
              "MECHANICAL_OR_INDUSTRIAL_ENGINEERING", "EDUCATION_MANAGEMENT"]
DEAL_STAGES = [("appointmentscheduled", "Appointment Scheduled"), ("qualifiedtobuy", "Qualified To Buy"),
               ("presentationscheduled", "Presentation Scheduled"),
               ("decisionmakerboughtin", "Decision Maker Bought-In"),
               ("contractsent", "Contract Sent"), ("closedwon", "Closed Won"), ("closedlost", "Closed Lost")]
DEAL_TAGS = [("upsell", "Upsell"), ("renewal", "Renewal"), ("partner", "Partner"), ("urgent", "Urgent")]
CAR_COLORS = [("red", "Red"), ("blue", "Blue"), ("black", "Black"), ("white", "White"), ("silver", "Silver")]
CAR_FEATURES = [("sunroof", "Sunroof"), ("heated_seats", "Heated seats"), ("tow_hitch", "Tow hitch"),
                ("awd", "All-wheel drive")]


def contacts_type():
    props = [
        P("email", "string", "text", "Email", group="contactinformation", unique=True),
        P("firstname", "string", "text", "First Name", group="contactinformation"),
        P("lastname", "string", "text", "Last Name", group="contactinformation"),
        P("phone", "string", "phonenumber", "Phone Number", group="contactinformation"),
        P("jobtitle", "string", "text", "Job Title", group="contactinformation"),
        P("company", "string", "text", "Company Name", group="contactinformation"),
        P("notes", "string", "textarea", "Notes", hubspot_defined=False),
        P("lifecyclestage", "enumeration", "radio", "Lifecycle Stage", options=LIFECYCLE),
        P("hs_lead_status", "enumeration", "select", "Lead Status", options=LEAD_STATUS),
        P("interests", "enumeration", "checkbox", "Interests", options=INTERESTS, hubspot_defined=False),
        P("vip", "bool", "booleancheckbox", "VIP", options=[("true", "Yes"), ("false", "No")],
          hubspot_defined=False),
        P("date_of_birth", "date", "date", "Date of birth"),
        P("lifetime_value", "number", "number", "Lifetime value", hubspot_defined=False),
        P("hs_analytics_num_visits", "number", "number", "Number of Sessions", calculated=True),
        P("associatedcompanyid", "number", "number", "Primary Associated Company ID", read_only=True),
        P("health_notes", "string", "textarea", "Health notes", hubspot_defined=False, sensitive=True),
    ] + system_props("createdate", "lastmodifieddate", extra_lastmod="hs_lastmodifieddate")
    return ObjectType("contacts", "0-1", "Contact", "Contacts", props,
                      ["createdate", "email", "firstname", "hs_object_id", "lastmodifieddate", "lastname"],
                      ["email", "firstname", "lastname", "phone", "company"],
                      lastmod_prop="lastmodifieddate", first_id=901, primary_display="email")


def companies_type():
    props = [
        P("name", "string", "text", "Company name", group="companyinformation"),
        P("domain", "string", "text", "Company Domain Name", group="companyinformation", unique=True),
        P("industry", "enumeration", "select", "Industry", options=INDUSTRIES),
        P("numberofemployees", "number", "number", "Number of Employees"),
        P("annualrevenue", "number", "number", "Annual Revenue"),
        P("city", "string", "text", "City"),
        P("country", "string", "text", "Country/Region"),
        P("phone", "string", "phonenumber", "Phone Number"),
        P("is_public", "bool", "booleancheckbox", "Is Public", options=[("true", "True"), ("false", "False")]),
        P("founded_year", "string", "text", "Year Founded"),
        P("description", "string", "textarea", "Description"),
    ] + system_props("createdate", "hs_lastmodifieddate")
    return ObjectType("companies", "0-2", "Company", "Companies", props,
                      ["createdate", "domain", "hs_lastmodifieddate", "hs_object_id", "name"],
                      ["name", "domain", "phone"], first_id=7001)


def deals_type():
    props = [
        P("dealname", "string", "text", "Deal Name", group="dealinformation"),
        P("amount", "number", "number", "Amount", group="dealinformation"),
        P("dealstage", "enumeration", "radio", "Deal Stage", options=DEAL_STAGES),
        P("pipeline", "enumeration", "select", "Pipeline", options=[("default", "Sales Pipeline")]),
        P("closedate", "datetime", "date", "Close Date"),
        P("dealtype", "enumeration", "radio", "Deal Type",
          options=[("newbusiness", "New Business"), ("existingbusiness", "Existing Business")]),
        P("deal_tags", "enumeration", "checkbox", "Deal tags", options=DEAL_TAGS, hubspot_defined=False),
        P("hs_is_closed", "bool", "calculation_equation", "Is Deal Closed?", calculated=True),
        P("hs_forecast_probability", "number", "number", "Forecast probability"),
    ] + system_props("createdate", "hs_lastmodifieddate")
    return ObjectType("deals", "0-3", "Deal", "Deals", props,
                      ["amount", "closedate", "createdate", "dealname", "dealstage",
                       "hs_lastmodifieddate", "hs_object_id", "pipeline"],
                      ["dealname"], first_id=30001, primary_display="dealname")


def cars_type(portal_id):
    created = datetime(2023, 2, 1, 10, 0, 0, 123000, tzinfo=UTC)

    def C(*a, **kw):
        return P(*a, hubspot_defined=False, created=created, **kw)
    props = [
        C("name", "string", "text", "Name"),
        C("vin", "string", "text", "VIN", unique=True),
        C("year", "number", "number", "Year"),
        C("price", "number", "number", "Price"),
        C("color", "enumeration", "select", "Color", options=CAR_COLORS),
        C("features", "enumeration", "checkbox", "Features", options=CAR_FEATURES),
        C("in_stock", "bool", "booleancheckbox", "In stock", options=[("true", "Yes"), ("false", "No")]),
        C("purchase_date", "date", "date", "Purchase date"),
        C("last_service", "datetime", "date", "Last service"),
    ] + system_props("hs_createdate", "hs_lastmodifieddate")
    return ObjectType("p_cars", "2-1234567", "Car", "Cars", props,
                      ["hs_createdate", "hs_lastmodifieddate", "hs_object_id"], ["name", "vin"],
                      created_prop="hs_createdate", custom=True, fqn="p%d_cars" % portal_id,
                      first_id=900001)


# ----------------------------------------------------------------------------
# Association types (v4): typeId per direction, category, label
# ----------------------------------------------------------------------------

class AssocType:
    def __init__(self, type_id, from_type, to_type, category, label, v3_name):
        self.type_id = type_id
        self.from_type = from_type
        self.to_type = to_type
        self.category = category
        self.label = label
        self.v3_name = v3_name
        self.inverse = None

    def spec(self):
        return {"category": self.category, "typeId": self.type_id, "label": self.label}


def association_types():
    """HubSpot-defined ids for the standard pairs; user-defined ones for the rest."""
    pairs = [
        # (a, b, a->b id, b->a id, category, label, v3 names, unlabeled?)
        ("contacts", "companies", 279, 280, "HUBSPOT_DEFINED", None,
         ("contact_to_company_unlabeled", "company_to_contact_unlabeled")),
        ("contacts", "companies", 1, 2, "HUBSPOT_DEFINED", "Primary",
         ("contact_to_company", "company_to_contact")),
        ("contacts", "companies", 101, 102, "USER_DEFINED", "Former employee", ("101", "102")),
        ("deals", "contacts", 3, 4, "HUBSPOT_DEFINED", None, ("deal_to_contact", "contact_to_deal")),
        ("deals", "companies", 341, 342, "HUBSPOT_DEFINED", None,
         ("deal_to_company_unlabeled", "company_to_deal_unlabeled")),
        ("deals", "companies", 5, 6, "HUBSPOT_DEFINED", "Primary", ("deal_to_company", "company_to_deal")),
        ("p_cars", "contacts", 85, 86, "USER_DEFINED", None, ("car_to_contact", "contact_to_car")),
    ]
    out = []
    for a, b, ab, ba, cat, label, (n1, n2) in pairs:
        t1 = AssocType(ab, a, b, cat, label, n1)
        t2 = AssocType(ba, b, a, cat, label, n2)
        t1.inverse, t2.inverse = t2, t1
        out += [t1, t2]
    return out


ASSOC_TYPES = association_types()
ASSOC_BY_ID = {(t.from_type, t.to_type, t.type_id): t for t in ASSOC_TYPES}
PRIMARY_IDS = {1, 5}            # contact->company and deal->company "Primary": at most one each


def unlabeled_type(from_type, to_type):
    for t in ASSOC_TYPES:
        if t.from_type == from_type and t.to_type == to_type and t.label is None:
            return t
    return None


# ----------------------------------------------------------------------------
# Seed data
# ----------------------------------------------------------------------------

FIRST_NAMES = ["James", "Mary", "José", "Zoë", "Łukasz", "Søren", "Aoife", "Nguyễn", "Ana María",
               "O'Neil", "Chloé", "Mehmet", "Ngozi", "Hiroshi", "Fatima", "Björn", "Priya", "Ólafur"]
LAST_NAMES = ["Smith", "O'Brien", "Müller", "García", "Åkesson", "Kowalski", "Nakamura", "渡辺",
              "Nguyen", "Dubois", "Ivanova", "Okafor", "Rossi", "Ström", "van der Berg", "Çelik"]
TITLES = ["CEO", "CTO", "VP, Sales", "Director of R&D", "Account Manager", "Engineer",
          "Head of \"Growth\"", "Chief Happiness Officer"]
COMPANY_WORDS = ["Acme", "Globex", "Initech", "Umbrella", "Stark", "Wayne", "Hooli", "Vandelay",
                 "Soylent", "Tyrell", "Cyberdyne", "Wonka", "Pied Piper", "Müller & Söhne"]
COMPANY_SUFFIX = ["Inc.", "GmbH", "Ltd", "LLC", "S.A.", "Corp.", "& Co", "Group"]
CITIES = [("San Francisco", "United States"), ("München", "Germany"), ("Kraków", "Poland"),
          ("São Paulo", "Brazil"), ("東京", "Japan"), ("Dublin", "Ireland"), ("Lagos", "Nigeria")]
NOTES = ["Prefers email; no calls", "Said \"call me later\"", "It's complicated; see notes\nline two",
         "Met at the fair — très intéressé", "Tab\tseparated", "Backslash \\ and 100% sure"]
CAR_MODELS = ["Model T", "Beetle", "Mini", "Corolla", "Civic", "Golf", "Mustang", "2CV"]


def ascii_slug(text):
    return re.sub(r"[^a-z0-9]+", "", text.lower().encode("ascii", "ignore").decode()) or "x"


def maybe(rng, p, value):
    """value with probability p, else None (empty properties are null on the wire)."""
    return value if rng.random() < p else None


def random_instant(rng, start, end):
    span_ms = max(1, int((end - start).total_seconds() * 1000))
    return start + timedelta(milliseconds=rng.randrange(span_ms))


# ----------------------------------------------------------------------------
# Rate limits
# ----------------------------------------------------------------------------

class Window:
    """Request times (monotonic seconds) in a rolling window."""

    def __init__(self):
        self.times = collections.deque()

    def count(self, now, span):
        while self.times and self.times[0] <= now - span:
            self.times.popleft()
        return len(self.times)

    def recent(self, now, span):
        """Requests in the last `span` seconds (without dropping older ones)."""
        return sum(1 for t in self.times if t > now - span)


class Limiter:
    """Burst per app per 10 s, daily per account (private apps only), search per second.

    Rate windows run on the real monotonic clock, not the shiftable server clock, so
    moving the clock in a test never fills or drains a window."""

    def __init__(self, cfg):
        self.burst_max = {"private": cfg.burst_limit, "oauth": cfg.oauth_burst_limit}
        self.daily_max = cfg.daily_limit
        self.search_per_second = cfg.search_rate
        self.tz_offset = timedelta(0)
        self.windows = {"private": Window(), "oauth": Window()}
        self.search = Window()
        self.daily_used = 0
        self.day = None

    def roll_day(self, server_now):
        """The daily count resets at midnight in the account's time zone."""
        today = (server_now + self.tz_offset).date()
        if today != self.day:
            self.day, self.daily_used = today, 0

    def admit(self, app, is_search, server_now):
        """Count one request, or raise RateLimitError naming the policy it broke."""
        now = time.monotonic()
        self.roll_day(server_now)
        if is_search and self.search.count(now, 1.0) >= self.search_per_second:
            raise RateLimitError("SECONDLY")
        if self.windows[app].count(now, BURST_WINDOW) >= self.burst_max[app]:
            raise RateLimitError("TEN_SECONDLY_ROLLING", self.headers(app, server_now))
        if app == "private" and self.daily_used >= self.daily_max:
            raise RateLimitError("DAILY", self.headers(app, server_now))
        self.windows[app].times.append(now)
        if is_search:
            self.search.times.append(now)
        if app == "private":
            self.daily_used += 1

    def headers(self, app, server_now):
        now = time.monotonic()
        used = self.windows[app].count(now, BURST_WINDOW)
        burst = self.burst_max[app]
        secondly = max(1, burst // 10)
        h = {}
        if app == "private":
            # OAuth apps have no daily cap, hence no daily headers.
            self.roll_day(server_now)
            h["X-HubSpot-RateLimit-Daily"] = str(self.daily_max)
            h["X-HubSpot-RateLimit-Daily-Remaining"] = str(max(0, self.daily_max - self.daily_used))
        h["X-HubSpot-RateLimit-Interval-Milliseconds"] = str(int(BURST_WINDOW * 1000))
        h["X-HubSpot-RateLimit-Max"] = str(burst)
        h["X-HubSpot-RateLimit-Remaining"] = str(max(0, burst - used))
        h["X-HubSpot-RateLimit-Secondly"] = str(secondly)
        h["X-HubSpot-RateLimit-Secondly-Remaining"] = str(max(0, secondly - self.windows[app].recent(now, 1.0)))
        return h

    def reset_windows(self):
        for w in list(self.windows.values()) + [self.search]:
            w.times.clear()


# ----------------------------------------------------------------------------
# Search: request validation, filters, sorting
# ----------------------------------------------------------------------------

OPERATORS = {"EQ", "NEQ", "LT", "LTE", "GT", "GTE", "BETWEEN", "IN", "NOT_IN", "HAS_PROPERTY",
             "NOT_HAS_PROPERTY", "CONTAINS_TOKEN", "NOT_CONTAINS_TOKEN"}


@functools.lru_cache(maxsize=400000)
def comparable(ptype, text):
    """A stored wire value as something ordered; None when empty or unparseable."""
    if text is None:
        return None
    if ptype == "number":
        try:
            return float(text)
        except ValueError:
            return None
    if ptype in ("datetime", "date"):
        dt = parse_instant(text)
        return to_ms(dt) if dt else None
    return text.lower()


def filter_operand(prop, value):
    """A filter's value in the same domain as comparable(); raises ApiError if malformed."""
    if value is None:
        raise bad_request()
    if prop.type == "number":
        try:
            return float(str(value))
        except ValueError:
            raise bad_request()
    if prop.type in ("datetime", "date"):
        # Datetime filters take epoch milliseconds (as a string); ISO and bare dates too.
        dt = parse_instant(value)
        if dt is None:
            raise bad_request()
        return to_ms(dt)
    if prop.type == "bool":
        return str(value).lower()
    return str(value).lower()


def token_regex(token):
    """CONTAINS_TOKEN: whole-word match, '*' as a wildcard at either end."""
    core = re.escape(token.strip("*"))
    left = r"\w*" if token.startswith("*") else r"\b"
    right = r"\w*" if token.endswith("*") else r"\b"
    return re.compile(left + core + right, re.IGNORECASE)


def compile_filter(otype, f):
    """One filter -> predicate(rec). Unknown properties and operators are 400s."""
    if not isinstance(f, dict):
        raise bad_request()
    name, op = f.get("propertyName"), f.get("operator")
    prop = otype.live_prop(name) if isinstance(name, str) else None
    if prop is None:
        raise bad_request("Property %r does not exist" % (name,))
    if op not in OPERATORS:
        raise bad_request()
    ptype = prop.type

    def value_of(rec):
        return rec["props"].get(name)

    if op in ("HAS_PROPERTY", "NOT_HAS_PROPERTY"):
        want = op == "HAS_PROPERTY"
        return lambda rec: (value_of(rec) is not None) == want
    if op in ("CONTAINS_TOKEN", "NOT_CONTAINS_TOKEN"):
        rx = token_regex(str(f.get("value", "")))
        want = op == "CONTAINS_TOKEN"
        return lambda rec: bool(value_of(rec) and rx.search(value_of(rec))) == want
    if op in ("IN", "NOT_IN"):
        values = f.get("values")
        if not isinstance(values, list) or not values:
            raise bad_request()
        wanted = {filter_operand(prop, v) for v in values}
        inside = op == "IN"

        def test_in(rec):
            text = value_of(rec)
            if text is None:
                return not inside
            hits = members(prop, text) & wanted
            return bool(hits) == inside
        return test_in
    if op == "BETWEEN":
        lo, hi = filter_operand(prop, f.get("value")), filter_operand(prop, f.get("highValue"))

        def test_between(rec):
            v = comparable(ptype, value_of(rec))
            return v is not None and lo <= v <= hi
        return test_between
    operand = filter_operand(prop, f.get("value"))
    if op in ("EQ", "NEQ"):
        equal = op == "EQ"

        def test_eq(rec):
            text = value_of(rec)
            if text is None:
                return not equal        # NEQ matches records without a value
            return (operand in members(prop, text)) == equal
        return test_eq
    cmp = {"LT": lambda a, b: a < b, "LTE": lambda a, b: a <= b,
           "GT": lambda a, b: a > b, "GTE": lambda a, b: a >= b}[op]

    def test_cmp(rec):
        v = comparable(ptype, value_of(rec))
        return v is not None and cmp(v, operand)
    return test_cmp


def members(prop, text):
    """The comparable values of one stored value: several for a multi-select."""
    if prop.multi:
        return {v.lower() for v in text.split(";")}
    return {comparable(prop.type, text)}


def compile_search(otype, body, limits):
    """Validate a search body; returns (predicate, sort key fn, properties, limit, after)."""
    if not isinstance(body, dict):
        raise bad_request()
    groups = body.get("filterGroups") or []
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise bad_request()
    n_filters = [len(g.get("filters") or []) for g in groups]
    if (len(groups) > limits["max_groups"] or any(n > limits["max_filters_per_group"] for n in n_filters)
            or sum(n_filters) > limits["max_filters_total"]):
        raise bad_request("Too many filters or filter groups: at most %d filterGroups with up to %d "
                          "filters each, %d filters in total."
                          % (limits["max_groups"], limits["max_filters_per_group"], limits["max_filters_total"]))
    compiled = [[compile_filter(otype, f) for f in (g.get("filters") or [])] for g in groups]
    query = body.get("query")
    text_pred = text_matcher(otype, query) if query else None

    def predicate(rec):
        if text_pred and not text_pred(rec):
            return False
        if not compiled:
            return True
        return any(all(t(rec) for t in group) for group in compiled)

    sort_key = compile_sort(otype, body.get("sorts"))
    limit = body.get("limit", SEARCH_DEFAULT_LIMIT)
    if isinstance(limit, str) and limit.isdigit():
        limit = int(limit)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1 or limit > SEARCH_MAX_LIMIT:
        raise bad_request("limit must be between 1 and %d" % SEARCH_MAX_LIMIT)
    after = body.get("after") or 0
    try:
        after = int(after)
        if after < 0:
            raise ValueError
    except (TypeError, ValueError):
        raise bad_request()
    props = body.get("properties")
    if props is not None and (not isinstance(props, list) or not all(isinstance(p, str) for p in props)):
        raise bad_request()
    return predicate, sort_key, props, limit, after


def text_matcher(otype, query):
    words = [w.lower() for w in str(query).split() if w]

    def match(rec):
        hay = " ".join((rec["props"].get(n) or "") for n in otype.search_text).lower()
        return all(w.strip("*") in hay for w in words)
    return match


def tie_breaker(rec_id):
    """Equal sort values come back in an arbitrary but stable order (like the search
    index), not by id: clients must not rely on a secondary order."""
    return (int(rec_id) * 2654435761) % 4294967296


def compile_sort(otype, sorts):
    if sorts in (None, []):
        return lambda rec: (0, int(rec["id"]))
    if not isinstance(sorts, list) or len(sorts) != 1:
        # Only one sort is allowed per search.
        raise bad_request("Only one sort is supported.")
    s = sorts[0]
    if isinstance(s, str):      # the legacy form: "createdate" or "-createdate"
        s = {"propertyName": s.lstrip("-"), "direction": "DESCENDING" if s.startswith("-") else "ASCENDING"}
    if not isinstance(s, dict):
        raise bad_request()
    prop = otype.live_prop(s.get("propertyName"))
    direction = s.get("direction", "ASCENDING")
    if prop is None or direction not in ("ASCENDING", "DESCENDING"):
        raise bad_request()
    desc = direction == "DESCENDING"
    name, ptype = prop.name, prop.type

    def key(rec):
        v = comparable(ptype, rec["props"].get(name))
        # Records without a value sort last in both directions.
        if v is None:
            return (1, 0, 0)
        if desc:
            v = -v if isinstance(v, float) or isinstance(v, int) else ReverseStr(v)
        return (0, v, tie_breaker(rec["id"]))
    return key


@functools.total_ordering
class ReverseStr:
    """A string that sorts backwards (for DESCENDING on text with nulls still last)."""
    __slots__ = ("s",)

    def __init__(self, s):
        self.s = s

    def __eq__(self, other):
        return self.s == other.s

    def __lt__(self, other):
        return self.s > other.s


# ----------------------------------------------------------------------------
# The account: all mutable state, guarded by one lock
# ----------------------------------------------------------------------------
#
# Records are dicts {id, props, created, updated, archived, archivedAt, mergedInto} that are
# replaced, never mutated: readers can render them outside the lock, and the search index
# can hold a write's version of a record as its snapshot.

class Account:
    def __init__(self, cfg):
        self.cfg = cfg
        self.lock = threading.RLock()
        self.clock_offset = 0.0
        self.tokens = {}                # access token -> {"expires": dt}
        self.tokens_issued = 0
        self.token_lifetime = cfg.token_lifetime
        self.limiter = Limiter(cfg)
        self.faults = []
        self.fault_seq = 0
        self.request_log = []
        self.endpoint_counts = {}
        self.base_url = None
        self.search_lag = cfg.search_lag
        self.search_limits = {"max_groups": 5, "max_filters_per_group": 6, "max_filters_total": 18}
        self.webhooks = WebhookSender("fake_hubspot")
        self.webhook_target = None
        self.webhook_batch = None
        self.webhook_event_seq = WEBHOOK_FIRST_EVENT_ID
        self.change_source = threading.local()      # .value: "API" or "CRM_UI" for this thread's writes
        self.merging = 0
        self.seed_data(cfg.contacts, cfg.companies, cfg.deals, cfg.cars, cfg.archived, cfg.seed)

    # -- clock -------------------------------------------------------------------

    def now(self):
        """Server time (shiftable); writes are stamped with millisecond precision."""
        return trunc_ms(datetime.now(UTC) + timedelta(seconds=self.clock_offset))

    # -- object types --------------------------------------------------------------

    def build_types(self):
        types = [contacts_type(), companies_type(), deals_type(), cars_type(self.cfg.portal_id)]
        self.types = {t.name: t for t in types}
        self.type_names = {}
        singular = {"contacts": "contact", "companies": "company", "deals": "deal"}
        for t in types:
            for alias in (t.name, t.type_id, singular.get(t.name), t.fqn, t.name[2:] if t.custom else None):
                if alias:
                    self.type_names[alias.lower()] = t

    def object_type(self, name):
        """Resolve contacts / contact / 0-1 / 2-1234567 / p<portal>_cars / p_cars."""
        return self.type_names.get((name or "").lower())

    def object_type_or_400(self, name):
        t = self.object_type(name)
        if t is None:
            raise unknown_object_type(name)
        return t

    # -- seeding -------------------------------------------------------------------

    def seed_data(self, n_contacts, n_companies, n_deals, n_cars, n_archived, seed):
        with self.lock:
            self.seed = seed
            self.build_types()
            rng = random.Random(seed)
            self.records = {t: {} for t in self.types}
            self.order = {t: [] for t in self.types}           # sorted int ids (no merged/purged)
            self.aliases = {t: {} for t in self.types}         # merged-away id -> surviving id
            self.next_id = {t: o.first_id for t, o in self.types.items()}
            self.index = {t: {} for t in self.types}           # what search can see
            self.pending = collections.deque()                 # (written_at, type, id, rec|None)
            self.index_gen = 0
            self.search_cache = collections.OrderedDict()
            self.assoc = {}                                    # (from, id, to) -> {toId: set(typeId)}
            self.base_time = self.cfg.base_time or self.now().replace(minute=0, second=0, microsecond=0)
            self.seed_companies(rng, n_companies)
            self.seed_contacts(rng, n_contacts, n_archived)
            self.seed_deals(rng, n_deals)
            self.seed_cars(rng, n_cars)
            self.pending.clear()                               # seeded data is already indexed
            for t in self.types:
                self.index[t] = {i: r for i, r in self.records[t].items() if visible(r)}

    def seed_stamps(self, rng):
        created = random_instant(rng, self.base_time - timedelta(days=365), self.base_time - timedelta(days=2))
        modified = random_instant(rng, created, self.base_time - timedelta(hours=1))
        return created, modified

    def seed_record(self, tname, rng, values, stamps=None):
        created, modified = stamps or self.seed_stamps(rng)
        otype = self.types[tname]
        rec_id = str(self.next_id[tname])
        self.next_id[tname] += rng.randint(1, 20)      # ids grow with gaps
        props = {name: otype.props[name].normalize(v) for name, v in values.items()}
        props.update({"hs_object_id": rec_id, otype.created_prop: fmt_instant(created),
                      otype.lastmod_prop: fmt_instant(modified)})
        rec = new_record(rec_id, props, created, modified)
        self.records[tname][rec_id] = rec
        self.order[tname].append(int(rec_id))
        return rec

    def seed_companies(self, rng, count):
        self.company_ids = []
        for i in range(count):
            word = COMPANY_WORDS[i % len(COMPANY_WORDS)]
            city, country = rng.choice(CITIES)
            rec = self.seed_record("companies", rng, {
                "name": "%s %s" % (word, rng.choice(COMPANY_SUFFIX)),
                "domain": "%s%d.example.com" % (ascii_slug(word), i),
                "industry": maybe(rng, 0.8, rng.choice(INDUSTRIES)),
                "numberofemployees": maybe(rng, 0.7, rng.choice([5, 12, 250, 1000, 25000])),
                "annualrevenue": maybe(rng, 0.6, "%d.%02d" % (rng.randrange(10 ** 7), rng.randrange(100))),
                "city": city, "country": country,
                "phone": maybe(rng, 0.5, "+1 415 555 %04d" % rng.randrange(10000)),
                "is_public": maybe(rng, 0.7, rng.random() < 0.3),
                "founded_year": maybe(rng, 0.5, str(rng.randint(1890, 2022))),
                "description": maybe(rng, 0.4, rng.choice(NOTES)),
            })
            self.company_ids.append(rec["id"])

    def seed_contacts(self, rng, count, n_archived):
        total = count + n_archived
        # A bulk import: 250 contacts share one lastmodifieddate millisecond, more than a
        # 200-record search page, so keyset paging on the stamp alone cannot work.
        burst = set(rng.sample(range(count), 250)) if count >= 300 else set()
        burst_stamp = random_instant(rng, self.base_time - timedelta(days=20), self.base_time - timedelta(days=19))
        for i in range(total):
            first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
            created, modified = self.seed_stamps(rng)
            if i in burst:
                created, modified = min(created, burst_stamp), burst_stamp
            rec = self.seed_record("contacts", rng, {
                "email": maybe(rng, 0.95, "%s.%s%d@example.com" % (ascii_slug(first), ascii_slug(last), i)),
                "firstname": first, "lastname": maybe(rng, 0.97, last),
                "phone": maybe(rng, 0.6, "+49 89 %07d" % rng.randrange(10 ** 7)),
                "jobtitle": maybe(rng, 0.7, rng.choice(TITLES)),
                "company": maybe(rng, 0.5, rng.choice(COMPANY_WORDS)),
                "notes": maybe(rng, 0.3, rng.choice(NOTES)),
                "lifecyclestage": maybe(rng, 0.9, rng.choice(LIFECYCLE)),
                "hs_lead_status": maybe(rng, 0.5, rng.choice(LEAD_STATUS)),
                "interests": maybe(rng, 0.6, [v for v, _ in rng.sample(INTERESTS, rng.randint(1, 3))]),
                "vip": maybe(rng, 0.8, rng.random() < 0.1),
                "date_of_birth": maybe(rng, 0.4, "%04d-%02d-%02d" % (rng.randint(1950, 2004), rng.randint(1, 12),
                                                                     rng.randint(1, 28))),
                "lifetime_value": maybe(rng, 0.5, rng.choice(["0", "12.5", "99.99", "1500", "100000.01"])),
                "hs_analytics_num_visits": rng.randint(0, 40),
                "health_notes": maybe(rng, 0.1, "allergic to peanuts"),
            }, stamps=(created, modified))
            if self.company_ids and rng.random() < 0.8:
                self.seed_assoc("contacts", rec["id"], "companies", rng.choice(self.company_ids), primary=True)
            if i >= count:
                # Seeded recycle bin: archived within the last 30 days (relative to start-up,
                # so the 90-day purge never hides them), stamp unchanged by archiving.
                archived_at = trunc_ms(datetime.now(UTC)) - timedelta(hours=rng.randint(1, 24 * 30))
                self.records["contacts"][rec["id"]] = dict(rec, archived=True, archivedAt=archived_at)

    def seed_deals(self, rng, count):
        contact_ids = [r["id"] for r in self.records["contacts"].values() if not r["archived"]]
        for i in range(count):
            stage = rng.choice(DEAL_STAGES)[0]
            closedate = random_instant(rng, self.base_time - timedelta(days=200), self.base_time + timedelta(days=200))
            if rng.random() < 0.5:
                closedate = closedate.replace(hour=0, minute=0, second=0, microsecond=0)   # "…T00:00:00Z"
            rec = self.seed_record("deals", rng, {
                "dealname": "%s — %s" % (rng.choice(COMPANY_WORDS), rng.choice(["renewal", "pilot", "expansion"])),
                "amount": maybe(rng, 0.9, rng.choice(["1500", "12.5", "250000", "99.95", "0"])),
                "dealstage": stage, "pipeline": "default",
                "closedate": maybe(rng, 0.8, fmt_instant(closedate)),
                "dealtype": maybe(rng, 0.6, rng.choice(["newbusiness", "existingbusiness"])),
                "deal_tags": maybe(rng, 0.4, [v for v, _ in rng.sample(DEAL_TAGS, rng.randint(1, 2))]),
                "hs_is_closed": stage in ("closedwon", "closedlost"),
                "hs_forecast_probability": maybe(rng, 0.7, rng.choice(["0.1", "0.5", "0.9", "1"])),
            })
            for cid in rng.sample(contact_ids, min(len(contact_ids), rng.randint(0, 2))):
                self.seed_assoc("deals", rec["id"], "contacts", cid)
            if self.company_ids and rng.random() < 0.7:
                self.seed_assoc("deals", rec["id"], "companies", rng.choice(self.company_ids), primary=True)

    def seed_cars(self, rng, count):
        contact_ids = [r["id"] for r in self.records["contacts"].values() if not r["archived"]]
        for i in range(count):
            rec = self.seed_record("p_cars", rng, {
                "name": "%s #%d" % (rng.choice(CAR_MODELS), i),
                "vin": "VIN%014d" % rng.randrange(10 ** 14),
                "year": rng.randint(1960, 2024),
                "price": maybe(rng, 0.8, "%d.%02d" % (rng.randrange(100000), rng.randrange(100))),
                "color": maybe(rng, 0.9, rng.choice(CAR_COLORS)[0]),
                "features": maybe(rng, 0.5, [v for v, _ in rng.sample(CAR_FEATURES, rng.randint(1, 3))]),
                "in_stock": rng.random() < 0.5,
                "purchase_date": maybe(rng, 0.6, "20%02d-%02d-%02d" % (rng.randint(0, 24), rng.randint(1, 12),
                                                                       rng.randint(1, 28))),
                "last_service": maybe(rng, 0.5, fmt_instant(random_instant(rng, self.base_time - timedelta(days=400),
                                                                           self.base_time - timedelta(days=3)))),
            })
            if contact_ids and rng.random() < 0.8:
                self.seed_assoc("p_cars", rec["id"], "contacts", rng.choice(contact_ids))

    def seed_assoc(self, ftype, fid, ttype, tid, primary=False):
        """Seeded associations: also mirror a contact's primary company (no stamp bump;
        seeded records are not published yet, so changing them in place is safe)."""
        self.link(ftype, fid, ttype, tid, unlabeled_type(ftype, ttype).type_id)
        if primary:
            self.link(ftype, fid, ttype, tid, 1 if ftype == "contacts" else 5)
            if ftype == "contacts":
                rec = self.records["contacts"][fid]
                rec["props"]["associatedcompanyid"] = tid

    # -- records -------------------------------------------------------------------

    def record(self, tname, rec_id):
        """The record for an id (old merged ids resolve to the surviving record)."""
        rec_id = str(rec_id)
        return self.records[tname].get(self.aliases[tname].get(rec_id, rec_id))

    def store(self, tname, rec):
        """Replace a record and queue its new version for the search index. The lag runs
        from the moment of the write, whatever stamp the record carries."""
        old = self.records[tname].get(rec["id"])
        self.records[tname][rec["id"]] = rec
        self.pending.append((self.now(), tname, rec["id"], rec if visible(rec) else None))
        if self.webhook_target is not None and not self.merging:
            self.webhook_changes(tname, old, rec)

    # -- webhooks --------------------------------------------------------------------

    def source(self):
        return getattr(self.change_source, "value", None) or "CRM_UI"

    def webhook_changes(self, tname, old, new):
        """The events a write makes (caller holds the lock)."""
        kind = WEBHOOK_OBJECTS.get(tname)
        if kind is None:
            return
        if old is None:
            self.webhook_event(kind, "creation", new["id"], new["created"], changeFlag="NEW")
        elif not old["archived"] and new["archived"]:
            self.webhook_event(kind, "deletion", new["id"], new["archivedAt"] or self.now(), changeFlag="DELETED")
        elif old["archived"] and not new["archived"]:
            self.webhook_event(kind, "restore", new["id"], self.now())
        elif visible(old) and visible(new):
            at = new["updated"] if new["updated"] != old["updated"] else self.now()
            names = sorted(set(old["props"]) | set(new["props"]))
            for name in names:
                value = new["props"].get(name)
                if old["props"].get(name) != value:
                    self.webhook_event(kind, "propertyChange", new["id"], at, propertyName=name,
                                       propertyValue="" if value is None else str(value))

    def webhook_event(self, kind, what, obj_id, at, **extra):
        target = self.webhook_target
        stype = "%s.%s" % (kind, what)
        if target["subscription_types"] is not None and stype not in target["subscription_types"]:
            return
        if (what == "propertyChange" and target["property_names"] is not None
                and extra.get("propertyName") not in target["property_names"]):
            return
        self.webhook_event_seq += 1
        event = {"eventId": self.webhook_event_seq,
                 "subscriptionId": WEBHOOK_FIRST_SUBSCRIPTION_ID + subscription_index(stype),
                 "portalId": self.cfg.portal_id, "appId": target["app_id"], "occurredAt": to_ms(at),
                 "subscriptionType": stype, "attemptNumber": 0, "objectId": int(obj_id),
                 "changeSource": self.source()}
        event.update(extra)
        if self.webhooks.held:
            self.webhooks.record({"event_ids": [event["eventId"]]}, target["url"], 1, "dropped")
            return
        self.webhook_batch.add(event)

    def webhook_flush(self, target, events):
        """A batch of events becomes one delivery (a JSON array), signed per attempt."""
        def build(attempt):
            body = json.dumps([dict(e, attemptNumber=attempt - 1) for e in events],
                              separators=(",", ":"), ensure_ascii=False).encode()
            return target["url"], body, hubspot_webhook_headers(target["url"], body, target["client_secret"],
                                                                int(time.time() * 1000))
        self.webhooks.submit(build, {"event_ids": [e["eventId"] for e in events]}, url=target["url"],
                             retry=hubspot_retries)

    def set_webhook_target(self, payload):
        if not isinstance(payload, dict) or not isinstance(payload.get("url"), str) \
                or not re.match(r"^https?://[^/\s]+", payload["url"]):
            raise AdminError(400, "body {url (http[s]://...), client_secret?, max_batch?, subscription_types?, "
                                  "property_names?}")
        unknown = set(payload) - {"url", "client_secret", "max_batch", "subscription_types", "property_names",
                                  "app_id"}
        if unknown:
            raise AdminError(400, "unknown field(s): %s" % ", ".join(sorted(unknown)))
        max_batch = payload.get("max_batch", WEBHOOK_MAX_BATCH)
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= WEBHOOK_MAX_BATCH:
            raise AdminError(400, "max_batch must be 1..%d" % WEBHOOK_MAX_BATCH)
        types = payload.get("subscription_types")
        if types is not None and (not isinstance(types, list) or any(
                not isinstance(t, str) or t.split(".", 1)[0] not in WEBHOOK_OBJECTS.values()
                or t.split(".", 1)[-1] not in WEBHOOK_KINDS for t in types)):
            raise AdminError(400, "subscription_types: e.g. contact.creation, company.propertyChange, deal.deletion")
        names = payload.get("property_names")
        if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
            raise AdminError(400, "property_names must be a list of names")
        secret = payload.get("client_secret", self.cfg.client_secret)
        if not isinstance(secret, str) or not secret:
            raise AdminError(400, "client_secret must be a non-empty string")
        target = {"url": payload["url"], "client_secret": secret, "max_batch": max_batch,
                  "subscription_types": types, "property_names": names,
                  "app_id": int(payload.get("app_id", WEBHOOK_APP_ID))}
        with self.lock:
            self.drop_webhook_target()
            self.webhook_target = target
            self.webhook_batch = Debouncer(self.webhooks, WEBHOOK_BATCH_WINDOW,
                                           lambda events: self.webhook_flush(target, events), max_batch)
        return dict(target)

    def drop_webhook_target(self):
        with self.lock:
            had = self.webhook_target is not None
            if self.webhook_batch is not None:
                self.webhook_batch.fire()       # events already made still go out
            self.webhook_target = self.webhook_batch = None
            return had

    def validate(self, otype, values, admin):
        """Normalize {name: raw} to wire strings; API writes may not touch read-only ones."""
        if not isinstance(values, dict):
            raise bad_request("properties must be an object")
        out, problems = {}, []
        for name, raw in values.items():
            prop = otype.live_prop(name)
            if prop is None:
                problems.append((name, "PROPERTY_DOESNT_EXIST", 'Property "%s" does not exist' % name))
                continue
            if prop.read_only and not admin:
                problems.append((name, "READ_ONLY_VALUE", '"%s" is a read only property; its value cannot be set.'
                                 % name))
                continue
            try:
                out[name] = prop.normalize(raw)
            except ValueError as e:
                problems.append((name, e.args[0], e.args[1]))
        if problems:
            if admin:
                raise AdminError(400, "; ".join(m for _, _, m in problems))
            detail = [{"isValid": False, "message": m, "error": code, "name": n} for n, code, m in problems]
            raise bad_request("Property values were not valid: " + json.dumps(detail, separators=(",", ":")),
                              errors=[{"message": m, "code": code, "context": {"propertyName": [n]}}
                                      for n, code, m in problems])
        return out

    def derived(self, tname, props):
        """Calculated properties HubSpot maintains itself."""
        if tname == "deals":
            props["hs_is_closed"] = "true" if props.get("dealstage") in ("closedwon", "closedlost") else "false"

    def create(self, tname, values, at=None, admin=False):
        with self.lock:
            otype = self.types[tname]
            props = self.validate(otype, values, admin)
            now = at or self.now()
            rec_id = str(self.next_id[tname])
            self.next_id[tname] += 1
            props.update({"hs_object_id": rec_id, otype.created_prop: fmt_instant(now),
                          otype.lastmod_prop: fmt_instant(now)})
            self.derived(tname, props)
            rec = new_record(rec_id, props, now, now)
            bisect.insort(self.order[tname], int(rec_id))
            self.store(tname, rec)
            return rec

    def live(self, tname, rec_id, admin=True):
        """A live record (merged ids followed), else the admin or the API not-found error."""
        rec = self.record(tname, rec_id)
        if rec is None or rec["archived"] or rec["mergedInto"]:
            if admin:
                raise AdminError(404, "no live %s record %s" % (tname, rec_id))
            raise object_not_found(rec_id)
        return rec

    def update(self, tname, rec_id, values, bump=True, at=None, admin=False):
        """Property change; bump=False models calculated values that keep the stamp."""
        with self.lock:
            rec = self.live(tname, rec_id, admin)
            otype = self.types[tname]
            props = dict(rec["props"])
            props.update(self.validate(otype, values, admin))
            self.derived(tname, props)
            now = at or self.now()
            updated = rec["updated"]
            if bump:
                updated = now
                props[otype.lastmod_prop] = fmt_instant(now)
            new = dict(rec, props=props, updated=updated)
            previous = getattr(self.change_source, "value", None)
            if not bump:
                self.change_source.value = "CALCULATED"
            try:
                self.store(tname, new)
            finally:
                self.change_source.value = previous
            return new

    def bulk_update(self, tname, ids, count, values, at=None):
        """Many records stamped in one millisecond (a workflow or import touching them all)."""
        with self.lock:
            if ids is None:
                ids = [str(i) for i in self.order[tname]
                       if not self.records[tname][str(i)]["archived"]][:int(count)]
            at = at or self.now()
            for rec_id in ids:
                self.update(tname, rec_id, values, at=at, admin=True)
            return {"ids": [str(i) for i in ids], "lastmodified": fmt_instant(at), "epochMs": to_ms(at)}

    def archive(self, tname, rec_id, admin=False):
        """Into the recycle bin. The last-modified stamp does NOT change."""
        with self.lock:
            rec = self.live(tname, rec_id, admin)
            new = dict(rec, archived=True, archivedAt=self.now())
            self.store(tname, new)
            return new

    def restore(self, tname, rec_id):
        with self.lock:
            rec = self.record(tname, rec_id)
            if rec is None or not rec["archived"] or not in_bin(rec, self.now()):
                raise AdminError(404, "no %s record %s in the recycle bin" % (tname, rec_id))
            new = dict(rec, archived=False, archivedAt=None)
            self.store(tname, new)
            return new

    def purge(self, tname, rec_id):
        """GDPR / permanent delete: gone everywhere, no trace in the archived list."""
        with self.lock:
            rec = self.record(tname, rec_id)
            if rec is None or rec["mergedInto"]:
                raise AdminError(404, "no %s record %s" % (tname, rec_id))
            del self.records[tname][rec["id"]]
            self.order[tname].remove(int(rec["id"]))
            self.pending.append((self.now(), tname, rec["id"], None))
            self.drop_links(tname, rec["id"])
            if self.webhook_target is not None and tname in WEBHOOK_OBJECTS:
                what = "privacyDeletion" if tname == "contacts" else "deletion"
                self.webhook_event(WEBHOOK_OBJECTS[tname], what, rec["id"], self.now(), changeFlag="DELETED")
            return rec

    def merge(self, tname, primary_id, other_id, admin=False):
        """HubSpot merges into a NEW record with a new id; both old ids then resolve to it."""
        def fail(message, status=400):
            if admin:
                raise AdminError(status, message)
            if status == 404:
                raise object_not_found(primary_id)
            raise bad_request(message)

        with self.lock:
            a, b = self.record(tname, primary_id), self.record(tname, other_id)
            if a is None or b is None or a["archived"] or b["archived"]:
                fail("Object not found", 404)
            if a["id"] == b["id"]:
                fail("Cannot merge an object with itself")
            otype = self.types[tname]
            now = self.now()
            # The primary's values win; the secondary only fills what the primary lacks.
            props = {k: v for k, v in b["props"].items() if v is not None}
            props.update({k: v for k, v in a["props"].items() if v is not None})
            merged_ids = []
            for rec in (a, b):
                merged_ids += (rec["props"].get("hs_merged_object_ids") or "").split(";") + [rec["id"]]
            new_id = str(self.next_id[tname])
            self.next_id[tname] += 1
            created = min(a["created"], b["created"])
            props.update({"hs_object_id": new_id, otype.created_prop: fmt_instant(created),
                          otype.lastmod_prop: fmt_instant(now),
                          "hs_merged_object_ids": ";".join(sorted({m for m in merged_ids if m}, key=int))})
            new = new_record(new_id, props, created, now)
            bisect.insort(self.order[tname], int(new_id))
            self.merging += 1
            try:
                self.store(tname, new)
                for old in (a, b):
                    self.store(tname, dict(old, mergedInto=new_id))
                    self.order[tname].remove(int(old["id"]))
                    self.aliases[tname][old["id"]] = new_id
            finally:
                self.merging -= 1
            if self.webhook_target is not None and tname in WEBHOOK_OBJECTS:
                moved = sum(1 for k, v in b["props"].items() if v is not None and a["props"].get(k) is None)
                self.webhook_event(WEBHOOK_OBJECTS[tname], "merge", new_id, now, changeFlag="MERGED",
                                   primaryObjectId=int(a["id"]), mergedObjectIds=[int(b["id"])],
                                   newObjectId=int(new_id), numberOfPropertiesMoved=moved)
            for old_id, target in list(self.aliases[tname].items()):
                if target in (a["id"], b["id"]):
                    self.aliases[tname][old_id] = new_id
            self.move_links(tname, [a["id"], b["id"]], new_id)
            return self.records[tname][new_id]

    # -- associations ----------------------------------------------------------------

    def link(self, ftype, fid, ttype, tid, type_id):
        """Add one association type in both directions (no stamps change)."""
        at = ASSOC_BY_ID[(ftype, ttype, type_id)]
        self.assoc.setdefault((ftype, fid, ttype), {}).setdefault(tid, set()).add(type_id)
        self.assoc.setdefault((ttype, tid, ftype), {}).setdefault(fid, set()).add(at.inverse.type_id)

    def unlink(self, ftype, fid, ttype, tid, type_id=None):
        """Remove one type, or all of them; removing the unlabeled type removes the pair."""
        forward = self.assoc.get((ftype, fid, ttype), {}).get(tid)
        if not forward:
            return
        unl = unlabeled_type(ftype, ttype)
        drop_all = type_id is None or (unl is not None and type_id == unl.type_id)
        for tyid in list(forward):
            if drop_all or tyid == type_id:
                forward.discard(tyid)
                inv = ASSOC_BY_ID[(ftype, ttype, tyid)].inverse.type_id
                self.assoc.get((ttype, tid, ftype), {}).get(fid, set()).discard(inv)
        for key, other in (((ftype, fid, ttype), tid), ((ttype, tid, ftype), fid)):
            if not self.assoc.get(key, {}).get(other):
                self.assoc.get(key, {}).pop(other, None)

    def set_association(self, ftype, fid, ttype, tid, type_id=None, remove=False):
        """Admin/API association change. Only the contact's primary company shows up as a
        property (associatedcompanyid), so only that bumps a stamp."""
        with self.lock:
            fid, tid = self.live(ftype, fid)["id"], self.live(ttype, tid)["id"]
            unl = unlabeled_type(ftype, ttype)
            if unl is None:
                raise AdminError(400, "no association between %s and %s" % (ftype, ttype))
            type_id = unl.type_id if type_id is None else int(type_id)
            if (ftype, ttype, type_id) not in ASSOC_BY_ID:
                raise AdminError(400, "typeId %s is not a %s->%s association type" % (type_id, ftype, ttype))
            if remove:
                self.unlink(ftype, fid, ttype, tid, type_id)
            else:
                if type_id in PRIMARY_IDS or ASSOC_BY_ID[(ftype, ttype, type_id)].inverse.type_id in PRIMARY_IDS:
                    self.drop_other_primaries(ftype, fid, ttype, tid, type_id)
                self.link(ftype, fid, ttype, tid, unl.type_id)       # any label implies unlabeled
                self.link(ftype, fid, ttype, tid, type_id)
            self.sync_primary_company(ftype, fid, ttype, tid)
            return {"from": {"type": ftype, "id": fid}, "to": {"type": ttype, "id": tid},
                    "types": sorted(self.assoc.get((ftype, fid, ttype), {}).get(tid, set()))}

    def drop_other_primaries(self, ftype, fid, ttype, tid, type_id):
        """A contact or deal has at most one primary company."""
        at = ASSOC_BY_ID[(ftype, ttype, type_id)]
        owner_type, owner_id, comp_type, primary = (ftype, fid, ttype, type_id) if type_id in PRIMARY_IDS \
            else (ttype, tid, ftype, at.inverse.type_id)
        for other, types in list(self.assoc.get((owner_type, owner_id, comp_type), {}).items()):
            if primary in types:
                types.discard(primary)
                inv = ASSOC_BY_ID[(owner_type, comp_type, primary)].inverse.type_id
                self.assoc.get((comp_type, other, owner_type), {}).get(owner_id, set()).discard(inv)

    def sync_primary_company(self, ftype, fid, ttype, tid):
        for t, i, other in ((ftype, fid, ttype), (ttype, tid, ftype)):
            if t == "contacts" and other == "companies":
                primaries = [c for c, types in self.assoc.get(("contacts", i, "companies"), {}).items()
                             if 1 in types and self.is_live("companies", c)]
                want = primaries[0] if primaries else None
                rec = self.records["contacts"][i]
                if rec["props"].get("associatedcompanyid") != want:
                    self.update("contacts", i, {"associatedcompanyid": want}, admin=True)

    def is_live(self, tname, rec_id):
        rec = self.records[tname].get(str(rec_id))
        return rec is not None and not rec["archived"] and not rec["mergedInto"]

    def links_of(self, ftype, fid, ttype):
        """[(toId, [AssocType])] to live records, sorted by numeric id."""
        out = []
        for tid, types in self.assoc.get((ftype, fid, ttype), {}).items():
            if types and self.is_live(ttype, tid):
                out.append((tid, [ASSOC_BY_ID[(ftype, ttype, t)] for t in sorted(types)]))
        return sorted(out, key=lambda x: int(x[0]))

    def drop_links(self, tname, rec_id):
        for (ftype, fid, ttype) in [k for k in self.assoc if k[0] == tname and k[1] == rec_id]:
            for tid in list(self.assoc.get((ftype, fid, ttype), {})):
                self.unlink(ftype, fid, ttype, tid)

    def move_links(self, tname, old_ids, new_id):
        """A merged record keeps every association of both records (primary's first)."""
        for old in old_ids:
            for (ftype, fid, ttype) in [k for k in self.assoc if k[0] == tname and k[1] == old]:
                for tid, types in list(self.assoc.get((ftype, fid, ttype), {}).items()):
                    for tyid in sorted(types):
                        if tyid in PRIMARY_IDS and any(tyid in t for t in
                                                       self.assoc.get((ftype, new_id, ttype), {}).values()):
                            continue
                        self.link(ftype, new_id, ttype, tid, tyid)
                    self.unlink(ftype, fid, ttype, tid)
        if tname == "contacts":
            comps = self.assoc.get(("contacts", new_id, "companies"), {})
            primaries = [c for c, t in comps.items() if 1 in t]
            rec = self.records["contacts"][new_id]
            props = dict(rec["props"], associatedcompanyid=primaries[0] if primaries else None)
            self.records["contacts"][new_id] = dict(rec, props=props)
            self.pending.append((self.now(), "contacts", new_id, self.records["contacts"][new_id]))

    # -- search index ----------------------------------------------------------------

    def flush_index(self, everything=False):
        """Apply writes older than the lag to the searchable index."""
        with self.lock:
            horizon = self.now() - timedelta(seconds=self.search_lag)
            n = 0
            while self.pending and (everything or self.pending[0][0] <= horizon):
                _, tname, rec_id, rec = self.pending.popleft()
                if rec is None:
                    self.index[tname].pop(rec_id, None)
                else:
                    self.index[tname][rec_id] = rec
                n += 1
            if n:
                self.index_gen += 1
            return n

    def search_ids(self, tname, cache_key, predicate, sort_key):
        """All matches of a search in order, cached per query until the index changes."""
        self.flush_index()
        with self.lock:
            key = (tname, cache_key, self.index_gen)
            hit = self.search_cache.get(key)
            if hit is not None:
                self.search_cache.move_to_end(key)
                return hit
            candidates = list(self.index[tname].values())
        matches = sorted((r for r in candidates if predicate(r)), key=sort_key)
        with self.lock:
            self.search_cache[key] = matches
            while len(self.search_cache) > 32:
                self.search_cache.popitem(last=False)
        return matches

    # -- tokens ----------------------------------------------------------------------

    def issue_token(self):
        with self.lock:
            token = "C" + "".join(random.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
                                  for _ in range(140))
            self.tokens[token] = {"expires": self.now() + timedelta(seconds=self.token_lifetime),
                                  "lifetime": self.token_lifetime}
            self.tokens_issued += 1
            return token, self.token_lifetime

    def authenticate(self, header):
        """-> "private" | "oauth" (the rate-limit bucket), or raise 401."""
        parts = (header or "").split(None, 1)
        if len(parts) != 2 or parts[0].lower() != "bearer":
            raise invalid_auth()
        token = parts[1].strip()
        if token == self.cfg.private_app_token:
            return "private"
        with self.lock:
            info = self.tokens.get(token)
        if info is None:
            raise invalid_auth()
        now = self.now()
        if now >= info["expires"]:
            raise expired_auth(info["expires"], now)
        return "oauth"

    # -- faults and request log ------------------------------------------------------

    def take_fault(self, target):
        with self.lock:
            return fault_pick(self.faults, target)

    def log_request(self, entry, endpoint):
        with self.lock:
            self.request_log.append(entry)
            if len(self.request_log) > 100000:
                del self.request_log[:50000]
            self.endpoint_counts[endpoint] = self.endpoint_counts.get(endpoint, 0) + 1


def subscription_index(stype):
    kind, what = stype.split(".", 1)
    kinds = list(WEBHOOK_OBJECTS.values())
    return kinds.index(kind) * len(WEBHOOK_KINDS) + WEBHOOK_KINDS.index(what)


def v3_uri(url):
    """The URI HubSpot signs: the target URL with the escapes its docs list decoded."""
    return re.sub(r"%[0-9A-Fa-f]{2}", lambda m: V3_URI_DECODE.get(m.group(0).upper(), m.group(0)), url)


def v3_signature(method, url, body, timestamp_ms, secret):
    msg = method.encode() + v3_uri(url).encode() + body + str(timestamp_ms).encode()
    return base64.b64encode(hmac.new(secret.encode(), msg, hashlib.sha256).digest()).decode()


def hubspot_webhook_headers(url, body, secret, timestamp_ms, signature=None, method="POST"):
    if signature is None:
        signature = v3_signature(method, url, body, timestamp_ms, secret)
    return {"Content-Type": "application/json", "X-HubSpot-Signature-v3": signature,
            "X-HubSpot-Request-Timestamp": str(timestamp_ms),
            "X-HubSpot-Signature": hashlib.sha256(secret.encode() + body).hexdigest(),
            "X-HubSpot-Signature-Version": "v1", "User-Agent": "HubSpot Connect 2.0 (http://dev.hubspot.com/)"}


def hubspot_retries(status):
    """HubSpot retries failed connections, timeouts, 5xx and 429, never another 4xx."""
    return not (isinstance(status, int) and 400 <= status < 500 and status != 429)


def new_record(rec_id, props, created, updated):
    return {"id": rec_id, "props": props, "created": created, "updated": updated,
            "archived": False, "archivedAt": None, "mergedInto": None}


def visible(rec):
    """Searchable: archived and merged-away records never appear in search."""
    return not rec["archived"] and not rec["mergedInto"]


def in_bin(rec, now):
    """Archived records stay in the recycle bin for 90 days, then are gone for good."""
    return rec["archived"] and rec["archivedAt"] > now - timedelta(days=RECYCLE_BIN_DAYS)


# ----------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------

def dumps(obj):
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def property_names(otype, requested):
    """What a response carries: asked-for properties that exist (unknown names are
    silently ignored), or the type's defaults, plus the three always-present ones."""
    if requested:
        names = {n for n in requested if otype.live_prop(n)}
    else:
        names = set(otype.defaults)
    return sorted(names | set(otype.always()))


def render(rec, names):
    out = {"id": rec["id"], "properties": {n: rec["props"].get(n) for n in names},
           "createdAt": fmt_instant(rec["created"]), "updatedAt": fmt_instant(rec["updated"]),
           "archived": rec["archived"]}
    if rec["archived"]:
        out["archivedAt"] = fmt_instant(rec["archivedAt"])
    return out


def split_list_param(values):
    """?properties=a,b and ?properties=a&properties=b are both accepted."""
    out = []
    for v in values or []:
        out += [p.strip() for p in v.split(",") if p.strip()]
    return out


def admin_view(otype, rec):
    live = [n for n, p in otype.props.items() if p.archived_at is None]
    view = render(rec, live)
    view["mergedInto"] = rec["mergedInto"]
    return view


def schema_view(account, otype):
    assoc = []
    for t in ASSOC_TYPES:
        if otype.name in (t.from_type, t.to_type) and t.label is None:
            f, to = account.types[t.from_type], account.types[t.to_type]
            assoc.append({"id": str(t.type_id), "fromObjectTypeId": f.type_id, "toObjectTypeId": to.type_id,
                          "name": t.v3_name.upper(), "createdAt": fmt_instant(otype.schema_created),
                          "updatedAt": fmt_instant(otype.schema_created)})
    return {
        "id": otype.type_id.split("-")[1], "objectTypeId": otype.type_id, "name": otype.name[2:],
        "fullyQualifiedName": otype.fqn, "labels": {"singular": otype.singular, "plural": otype.plural},
        "primaryDisplayProperty": otype.primary_display, "requiredProperties": [otype.primary_display],
        "searchableProperties": otype.search_text, "secondaryDisplayProperties": [],
        "properties": [p.describe() for p in otype.props.values() if p.archived_at is None],
        "associations": assoc, "metaType": "PORTAL_SPECIFIC", "archived": False,
        "createdAt": fmt_instant(otype.schema_created), "updatedAt": fmt_instant(otype.schema_created),
    }


# ----------------------------------------------------------------------------
# HTTP handler
# ----------------------------------------------------------------------------

def normalize_path(path):
    """Date-versioned paths (/crm/objects/2026-03/...) are aliases of the v3/v4 ones."""
    segs = path.split("/")
    if len(segs) > 3 and segs[1] == "crm" and segs[3] in DATE_VERSIONS:
        kind, rest = segs[2], segs[4:]
        if kind == "objects":
            v = "v4" if len(rest) >= 3 and rest[2] == "associations" else "v3"
            return "/".join(["", "crm", v, "objects"] + rest)
        if kind == "properties":
            return "/".join(["", "crm", "v3", "properties"] + rest)
        if kind == "associations":
            return "/".join(["", "crm", "v4", "associations"] + rest)
    if len(segs) > 3 and segs[1] == "crm-object-schemas" and segs[2] in DATE_VERSIONS:
        return "/".join(["", "crm", "v3"] + segs[3:])
    return path


def classify(path):
    """Endpoint label for /__admin/stats."""
    segs = [s for s in path.split("/") if s]
    if segs[:2] == ["oauth", "v1"]:
        return "token"
    if segs[:2] == ["crm", "v3"] and len(segs) >= 3:
        if segs[2] == "objects":
            if len(segs) == 4:
                return "list"
            if len(segs) == 5 and segs[4] in ("search", "merge"):
                return segs[4]
            if len(segs) == 6 and segs[4] == "batch":
                return "batch_read"
            return "object"
        return segs[2]              # properties, schemas
    if segs[:2] == ["crm", "v4"]:
        return "associations"
    if segs[:1] == ["account-info"]:
        return "usage"
    return "other"


class Handler(FaultDelivery, BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "cloudflare"
    account: Account = None         # set by main()
    verbose = False

    # -- plumbing ------------------------------------------------------------------

    def version_string(self):
        return self.server_version

    def log_message(self, fmt, *args):
        if self.verbose:
            sys.stderr.write("fake_hubspot: " + (fmt % args) + "\n")

    def date_time_string(self, timestamp=None):
        """The Date header follows the (possibly shifted) server clock."""
        return email.utils.formatdate(self.account.now().timestamp(), usegmt=True)

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
        self.log_done(status)
        self.send_response(status)
        if status != 204:
            self.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0" if status == 204 else str(len(body)))
        self.end_headers()
        if status != 204:
            self.wfile.write(body)

    def log_done(self, status):
        """Log an API request once, BEFORE its response leaves: a client that reads
        /__admin/requests right after a response must find that request there."""
        entry, self.log_entry = self.log_entry, None
        if entry is not None:
            entry["status"] = status
            self.account.log_request(entry, self.log_endpoint)

    def dispatch(self, method):
        self.log_entry = None
        self.answer_fault = self.stall_until = None
        split = urlsplit(self.path)
        path, query = split.path, split.query
        body = self.read_body() if method in ("POST", "PATCH", "PUT", "DELETE") else b""
        if path.startswith("/__admin"):
            self.account.change_source.value = "CRM_UI"
            self.handle_admin(method, path, query, body)
            return
        self.account.change_source.value = "API"
        self.log_endpoint = classify(normalize_path(path))
        self.log_entry = {"t": time.time(), "method": method, "path": path, "query": query, "status": 0}
        if method == "POST" and path.startswith("/crm"):
            try:
                self.log_entry["body"] = json.loads(body)
            except ValueError:
                pass
        try:
            self.handle_api(method, path, query, body)
        finally:
            self.log_done(0)        # no response was sent (dropped connection)
            self.finish_fault()

    # -- public API ------------------------------------------------------------------

    def handle_api(self, method, path, query, body):
        fault = self.account.take_fault(path + ("?" + query if query else ""))
        if fault and self.apply_fault(fault, path):
            return
        headers = {"X-HubSpot-Correlation-Id": correlation_id()}
        try:
            if path == "/oauth/v1/token":
                self.handle_token(method, body)
                return
            if path.startswith("/oauth/v1/access-tokens/"):
                self.handle_token_info(path.rsplit("/", 1)[1])
                return
            if len(self.requestline) > MAX_URI_BYTES:
                raise ApiError(414, "VALIDATION_ERROR", "URI Too Long")
            if not (path.startswith("/crm/") or path.startswith("/crm-object-schemas/")
                    or path.startswith("/account-info/")):
                raise resource_not_found()
            app = self.account.authenticate(self.headers.get("Authorization"))
            npath = normalize_path(path)
            is_search = method == "POST" and npath.endswith("/search")
            self.account.limiter.admit(app, is_search, self.account.now())
            if not is_search:
                # Search responses carry no rate-limit headers.
                headers.update(self.account.limiter.headers(app, self.account.now()))
            status, payload = self.route(method, npath, parse_qs(query, keep_blank_values=True), body)
            self.send(status, dumps(payload) if payload is not None else b"", headers=headers)
        except OAuthError as e:
            self.send(e.status, dumps(e.body), headers=headers)
        except (ApiError, RateLimitError) as e:
            self.send(e.status, dumps(e.body), headers=dict(headers, **e.headers))
        except Exception:
            # A bug in the fake must show up as a loud 500, not as a dropped connection.
            traceback.print_exc()
            self.send(500, dumps(default_error_body(500)), headers=headers)

    def apply_fault(self, fault, path):
        """Inject a configured failure. Returns True when the request was fully handled; False:
        answer normally (a fault on the real answer is then applied by send())."""
        if fault.get("delay"):
            time.sleep(float(fault["delay"]))
        if fault.get("reset"):
            self.log_done(0)
            self.reset_connection()
            return True
        if fault.get("drop"):
            self.log_done(0)
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
        else:
            payload = dumps(default_error_body(status, path))
        headers = dict(fault.get("headers") or {})
        if fault.get("truncate") or fault.get("stall") or fault.get("corrupt"):
            self.send_faulted(fault, status, payload, fault.get("content_type") or JSON_TYPE, headers)
            return True
        self.send(status, payload, ctype=fault.get("content_type") or JSON_TYPE, headers=headers)
        return True

    def fault_log(self, status):
        self.log_done(status)

    def fault_owner(self):
        return self.account

    def handle_token(self, method, body):
        """OAuth refresh: form-encoded client_id, client_secret, refresh_token."""
        if method != "POST":
            raise method_not_allowed(method)
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        form = {}
        if ctype == "application/x-www-form-urlencoded":
            form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}
        cfg = self.account.cfg
        if form.get("grant_type") != "refresh_token":
            raise OAuthError("BAD_GRANT_TYPE", "missing or unsupported grant_type")
        if form.get("client_id") != cfg.client_id:
            raise OAuthError("BAD_CLIENT_ID", "missing or invalid client_id")
        if form.get("client_secret") != cfg.client_secret:
            raise OAuthError("BAD_CLIENT_SECRET", "missing or invalid client_secret")
        if form.get("refresh_token") != cfg.refresh_token:
            raise OAuthError("BAD_REFRESH_TOKEN", "missing or invalid refresh token")
        token, lifetime = self.account.issue_token()
        # HubSpot refresh tokens do not rotate: the same one comes back.
        self.send(200, dumps({"token_type": "bearer", "refresh_token": cfg.refresh_token,
                              "access_token": token, "expires_in": int(lifetime)}),
                  headers={"Cache-Control": "no-store"})

    def handle_token_info(self, token):
        acct = self.account
        with acct.lock:
            info = acct.tokens.get(token)
        if info is None:
            raise ApiError(404, "OBJECT_NOT_FOUND", "access token not found")
        left = int((info["expires"] - acct.now()).total_seconds())
        self.send(200, dumps({"token": token, "user": "sync-test@example.com", "hub_domain": "example.com",
                              "scopes": ["oauth", "crm.objects.contacts.read", "crm.objects.companies.read",
                                         "crm.objects.deals.read", "crm.objects.custom.read",
                                         "crm.schemas.custom.read"],
                              "hub_id": acct.cfg.portal_id, "app_id": 424242, "expires_in": max(0, left),
                              "user_id": 1, "token_type": "access"}))

    # -- routes ----------------------------------------------------------------------

    def route(self, method, path, params, body):
        """Serve an authenticated, admitted request -> (status, JSON-able payload|None)."""
        segs = [s for s in path.split("/") if s]
        acct = self.account
        if segs[:3] == ["crm", "v3", "schemas"] and len(segs) <= 4:
            require(method, "GET")
            return 200, schemas_payload(acct, segs[3] if len(segs) == 4 else None)
        if segs[:3] == ["crm", "v3", "properties"] and len(segs) in (4, 5):
            require(method, "GET")
            otype = acct.object_type_or_400(segs[3])
            return 200, properties_payload(otype, segs[4] if len(segs) == 5 else None, params)
        if segs[:3] == ["crm", "v3", "objects"] and len(segs) >= 4:
            return self.route_objects(method, acct.object_type_or_400(segs[3]), segs[4:], params, body)
        if segs[:3] == ["crm", "v4", "objects"] and len(segs) == 7 and segs[5] == "associations":
            require(method, "GET")
            ftype, ttype = acct.object_type_or_400(segs[3]), acct.object_type_or_400(segs[6])
            return 200, associations_payload(acct, ftype, segs[4], ttype, params)
        if segs[:3] == ["crm", "v4", "associations"] and len(segs) == 7 and segs[5:] == ["batch", "read"]:
            require(method, "POST")
            ftype, ttype = acct.object_type_or_400(segs[3]), acct.object_type_or_400(segs[4])
            return association_batch_read(acct, ftype, ttype, json_body(body))
        if segs == ["account-info", "v3", "api-usage", "daily", "private-apps"]:
            require(method, "GET")
            return 200, usage_payload(acct)
        raise resource_not_found()

    def route_objects(self, method, otype, rest, params, body):
        acct = self.account
        if not rest:
            require(method, "GET", "POST")
            if method == "GET":
                return 200, list_payload(acct, otype, params, self.path)
            return 201, create_object(acct, otype, json_body(body))
        if rest == ["search"]:
            require(method, "POST")
            return 200, search_payload(acct, otype, json_body(body))
        if rest == ["batch", "read"]:
            require(method, "POST")
            return batch_read(acct, otype, json_body(body), params)
        if rest == ["merge"]:
            require(method, "POST")
            return 200, merge_objects(acct, otype, json_body(body))
        if len(rest) == 1:
            require(method, "GET", "PATCH", "DELETE")
            if method == "GET":
                return 200, read_payload(acct, otype, rest[0], params)
            if method == "PATCH":
                return 200, update_object(acct, otype, rest[0], json_body(body), params)
            acct.archive(otype.name, rest[0])
            return 204, None
        raise resource_not_found()

    # -- admin -------------------------------------------------------------------------

    def handle_admin(self, method, path, query, body):
        try:
            payload = json.loads(body) if body.strip() else {}
        except ValueError:
            self.send(400, dumps({"error": "body is not JSON"}))
            return
        params = {k: v[0] for k, v in parse_qs(query).items()}
        try:
            status, result = admin_route(self.account, method, path.rstrip("/").split("/")[2:], params, payload)
        except AdminError as e:
            status, result = e.status, {"error": str(e)}
        except ApiError as e:
            status, result = e.status, {"error": e.body["message"]}
        except Exception as e:
            traceback.print_exc()
            status, result = 500, {"error": "fake_hubspot bug: %r" % e}
        self.send(status, dumps(result))


def require(method, *allowed):
    if method not in allowed:
        raise method_not_allowed(method)


def json_body(body):
    if not body.strip():
        return {}
    try:
        return json.loads(body)
    except ValueError as e:
        raise bad_request("Invalid input JSON on line %d, column %d: %s" % (e.lineno, e.colno, e.msg)
                          if hasattr(e, "lineno") else "Invalid input JSON")


def int_param(params, name, default, lo, hi):
    """A numeric query parameter within [lo, hi]; anything else is a 400."""
    raw = (params.get(name) or [None])[0]
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad_request("%s must be a number" % name)
    if value < lo or value > hi:
        raise bad_request("%s must be between %d and %d" % (name, lo, hi))
    return value


def flag_param(params, name):
    return (params.get(name) or ["false"])[0].lower() == "true"


# -- objects -------------------------------------------------------------------------

def list_payload(acct, otype, params, raw_path):
    """GET /crm/v3/objects/{type}: ascending ids; `after` is the id to continue from."""
    limit = int_param(params, "limit", 10, 1, LIST_MAX_LIMIT)
    after = int_param(params, "after", 0, 0, 10 ** 15)
    archived = flag_param(params, "archived")
    names = property_names(otype, split_list_param(params.get("properties")))
    assoc_types = [acct.object_type(n) for n in split_list_param(params.get("associations"))]
    now = acct.now()
    with acct.lock:
        order, recs = acct.order[otype.name], acct.records[otype.name]
        page = []
        for i in order[bisect.bisect_left(order, after):]:
            rec = recs[str(i)]
            if in_bin(rec, now) if archived else visible(rec):
                page.append(rec)
                if len(page) > limit:
                    break
        more = len(page) > limit
        page = page[:limit]
        links = {r["id"]: {t.name: acct.links_of(otype.name, r["id"], t.name) for t in assoc_types if t}
                 for r in page} if assoc_types else {}
    results = []
    for rec in page:
        out = render(rec, names)
        if links.get(rec["id"]):
            out["associations"] = v3_associations(acct, links[rec["id"]])
        results.append(out)
    payload = {"results": results}
    if more:
        nxt = str(int(page[-1]["id"]) + 1)
        query = {k: v for k, v in parse_qs(urlsplit(raw_path).query, keep_blank_values=True).items() if k != "after"}
        query["after"] = [nxt]
        payload["paging"] = {"next": {"after": nxt, "link": "%s/crm/v3/objects/%s?%s" % (
            acct.base_url, otype.name, urlencode(query, doseq=True))}}
    return payload


def v3_associations(acct, by_type):
    """The v3 inline form: {companies: {results: [{id, type: "contact_to_company"}]}}."""
    out = {}
    for tname, links in by_type.items():
        if links:
            otype = acct.types[tname]
            out[otype.fqn if otype.custom else otype.name] = {
                "results": [{"id": tid, "type": t.v3_name} for tid, types in links for t in types]}
    return out


def read_payload(acct, otype, rec_id, params):
    archived = flag_param(params, "archived")
    names = property_names(otype, split_list_param(params.get("properties")))
    id_prop = (params.get("idProperty") or [None])[0]
    with acct.lock:
        rec = find_by_unique(acct, otype, id_prop, rec_id) if id_prop else acct.record(otype.name, rec_id)
        # An old id of a merged record answers with the merged record (and its new id).
        if rec is None or rec["mergedInto"] or rec["archived"] != archived or (archived and not in_bin(rec, acct.now())):
            raise object_not_found(rec_id)
        assoc_types = [acct.object_type(n) for n in split_list_param(params.get("associations"))]
        links = {t.name: acct.links_of(otype.name, rec["id"], t.name) for t in assoc_types if t}
    out = render(rec, names)
    if any(links.values()):
        out["associations"] = v3_associations(acct, links)
    return out


def find_by_unique(acct, otype, id_prop, value):
    prop = otype.live_prop(id_prop)
    if prop is None or not (prop.unique or id_prop == "hs_object_id"):
        raise bad_request("%s is not a unique property" % id_prop)
    for rec in acct.records[otype.name].values():
        if visible(rec) and (rec["props"].get(id_prop) or "").lower() == str(value).lower():
            return rec
    return None


def batch_read(acct, otype, body, params):
    """POST .../batch/read: up to 100 ids; missing ones make it a 207 with errors."""
    inputs = body.get("inputs") if isinstance(body, dict) else None
    if not isinstance(inputs, list) or not all(isinstance(i, dict) and "id" in i for i in inputs):
        raise bad_request()
    if len(inputs) > BATCH_READ_MAX:
        raise bad_request("Batch input limit of %d exceeded" % BATCH_READ_MAX)
    started = acct.now()
    names = property_names(otype, body.get("properties") or [])
    archived = flag_param(params, "archived")
    id_prop = body.get("idProperty")
    found, missing = [], []
    with acct.lock:
        for item in inputs:
            key = str(item["id"])
            rec = find_by_unique(acct, otype, id_prop, key) if id_prop else acct.record(otype.name, key)
            if rec is None or rec["mergedInto"] or rec["archived"] != archived:
                missing.append(key)
            elif rec["id"] not in [r["id"] for r in found]:
                found.append(rec)
    payload = {"status": "COMPLETE", "results": [render(r, names) for r in found],
               "startedAt": fmt_instant(started), "completedAt": fmt_instant(acct.now())}
    if not missing:
        return 200, payload
    payload["numErrors"] = 1
    payload["errors"] = [{"status": "error", "category": "OBJECT_NOT_FOUND",
                          "message": "Could not get some %s objects, they may be deleted or not exist. "
                                     "Check that ids are valid." % otype.singular.upper(),
                          "context": {"ids": missing}}]
    return 207, payload


def create_object(acct, otype, body):
    if not isinstance(body, dict) or not isinstance(body.get("properties", {}), dict):
        raise bad_request()
    values = body.get("properties") or {}
    assocs = parse_create_associations(acct, otype, body.get("associations") or [])
    rec = acct.create(otype.name, values)
    for ttype, tid, type_id in assocs:
        acct.set_association(otype.name, rec["id"], ttype, tid, type_id)
    rec = acct.records[otype.name][rec["id"]]
    return render(rec, property_names(otype, list(values)))


def parse_create_associations(acct, otype, items):
    """[{to: {id}, types: [{associationCategory, associationTypeId}]}] -> [(toType, id, typeId)]."""
    out = []
    for item in items:
        try:
            tid = str(item["to"]["id"])
            for spec in item["types"]:
                matches = [t for t in ASSOC_TYPES if t.from_type == otype.name
                           and t.type_id == int(spec["associationTypeId"])
                           and t.category == spec["associationCategory"]]
                if not matches or not acct.is_live(matches[0].to_type, tid):
                    raise bad_request("Invalid association %r" % (item,))
                out.append((matches[0].to_type, tid, matches[0].type_id))
        except (KeyError, TypeError, ValueError):
            raise bad_request()
    return out


def update_object(acct, otype, rec_id, body, params):
    if (params.get("idProperty") or [None])[0]:
        with acct.lock:
            rec = find_by_unique(acct, otype, params["idProperty"][0], rec_id)
        if rec is None:
            raise object_not_found(rec_id)
        rec_id = rec["id"]
    if not isinstance(body, dict) or not isinstance(body.get("properties"), dict):
        raise bad_request()
    rec = acct.update(otype.name, rec_id, body["properties"])
    return render(rec, property_names(otype, list(body["properties"])))


def merge_objects(acct, otype, body):
    if not isinstance(body, dict):
        raise bad_request()
    a, b = body.get("primaryObjectId"), body.get("objectIdToMerge")
    if not isinstance(a, (str, int)) or not isinstance(b, (str, int)):
        raise bad_request("primaryObjectId and objectIdToMerge are required")
    rec = acct.merge(otype.name, str(a), str(b))
    return render(rec, property_names(otype, None))


# -- search ---------------------------------------------------------------------------

def search_payload(acct, otype, body):
    predicate, sort_key, props, limit, after = compile_search(otype, body, acct.search_limits)
    if after + limit > SEARCH_RESULT_CAP:
        # Paging beyond the 10,000th result of a query is a 400 (paging.next still
        # pointed here: clients that follow it blindly get stuck).
        raise bad_request()
    cache_key = json.dumps([body.get("filterGroups"), body.get("sorts"), body.get("query")], sort_keys=True)
    matches = acct.search_ids(otype.name, cache_key, predicate, sort_key)
    names = property_names(otype, props)
    payload = {"total": len(matches), "results": [render(r, names) for r in matches[after:after + limit]]}
    if after + limit < len(matches):
        payload["paging"] = {"next": {"after": str(after + limit)}}
    return payload


# -- properties and schemas -------------------------------------------------------------

def properties_payload(otype, name, params):
    if name is not None:
        prop = otype.props.get(name)
        if prop is None:
            raise ApiError(404, "OBJECT_NOT_FOUND", "Unable to find property %s for object type %s"
                           % (name, otype.type_id))
        return prop.describe()
    archived = flag_param(params, "archived")
    # Sensitive properties are left out unless asked for by dataSensitivity.
    sensitivity = (params.get("dataSensitivity") or ["non_sensitive"])[0]
    want_sensitive = sensitivity in ("sensitive", "highly_sensitive")
    return {"results": [p.describe() for p in otype.props.values()
                        if (p.archived_at is not None) == archived and p.sensitive == want_sensitive]}


def schemas_payload(acct, name):
    if name is None:
        return {"results": [schema_view(acct, t) for t in acct.types.values() if t.custom]}
    otype = acct.object_type(name)
    if otype is None or not otype.custom:
        raise ApiError(404, "OBJECT_NOT_FOUND", "Unable to find object type %s" % name)
    return schema_view(acct, otype)


# -- associations v4 ----------------------------------------------------------------------

def associations_payload(acct, ftype, rec_id, ttype, params):
    """GET /crm/v4/objects/{from}/{id}/associations/{to}: toObjectId is a number here."""
    limit = int_param(params, "limit", ASSOC_PAGE_MAX, 1, ASSOC_PAGE_MAX)
    after = int_param(params, "after", 0, 0, 10 ** 15)
    with acct.lock:
        rec = acct.record(ftype.name, rec_id)
        links = acct.links_of(ftype.name, rec["id"], ttype.name) if rec is not None and visible(rec) else []
    links = [lk for lk in links if int(lk[0]) >= after]
    payload = {"results": [{"toObjectId": int(tid), "associationTypes": [t.spec() for t in types]}
                           for tid, types in links[:limit]]}
    if len(links) > limit:
        nxt = links[limit][0]
        payload["paging"] = {"next": {"after": nxt, "link": "%s/crm/v4/objects/%s/%s/associations/%s?after=%s"
                                      % (acct.base_url, ftype.name, rec_id, ttype.name, nxt)}}
    return payload


def association_batch_read(acct, ftype, ttype, body):
    """POST /crm/v4/associations/{from}/{to}/batch/read: ids without associations are
    errors (207), not empty results."""
    inputs = body.get("inputs") if isinstance(body, dict) else None
    if not isinstance(inputs, list) or not all(isinstance(i, dict) and "id" in i for i in inputs):
        raise bad_request()
    if len(inputs) > ASSOC_BATCH_MAX:
        raise bad_request("Batch input limit of %d exceeded" % ASSOC_BATCH_MAX)
    started = acct.now()
    results, errors = [], []
    with acct.lock:
        for item in inputs:
            fid = str(item["id"])
            rec = acct.record(ftype.name, fid)
            links = acct.links_of(ftype.name, rec["id"], ttype.name) if rec is not None and visible(rec) else []
            if links:
                results.append({"from": {"id": fid},
                                "to": [{"toObjectId": int(tid), "associationTypes": [t.spec() for t in types]}
                                       for tid, types in links[:ASSOC_PAGE_MAX]]})
            else:
                errors.append({"status": "error", "category": "OBJECT_NOT_FOUND",
                               "subCategory": "crm.associations.NO_ASSOCIATIONS_FOUND",
                               "context": {"fromObjectId": [fid]},
                               "message": "No %s is associated with %s %s." % (
                                   ttype.singular.lower(), ftype.singular.lower(), fid)})
    payload = {"status": "COMPLETE", "results": results,
               "startedAt": fmt_instant(started), "completedAt": fmt_instant(acct.now())}
    if not errors:
        return 200, payload
    payload["numErrors"] = len(errors)
    payload["errors"] = errors
    return 207, payload


def usage_payload(acct):
    now = acct.now()
    with acct.lock:
        acct.limiter.roll_day(now)
        lim = acct.limiter
        local_midnight = datetime.combine(lim.day + timedelta(days=1), datetime.min.time(), UTC) - lim.tz_offset
        return {"results": [{"name": "private-apps-api-calls-daily", "usageLimit": lim.daily_max,
                             "currentUsage": lim.daily_used, "collectedAt": fmt_instant(now),
                             "fetchStatus": "SUCCESS", "resetsAt": fmt_instant(local_midnight)}]}


def default_error_body(status, path=""):
    """What HubSpot sends for a status when a fault has no explicit body."""
    if path.startswith("/oauth"):
        if status < 500:
            return OAuthError("BAD_REFRESH_TOKEN", "missing or invalid refresh token").body
        return {"status": "error", "message": "internal error", "correlationId": correlation_id()}
    if status == 429:
        return rate_limit_body("ten_secondly_rolling", "TEN_SECONDLY_ROLLING")
    if status == 401:
        return ApiError(401, "INVALID_AUTHENTICATION", INVALID_AUTH_MESSAGE).body
    table = {
        400: ("VALIDATION_ERROR", "There was a problem with the request."),
        403: ("MISSING_SCOPES", "This app hasn't been granted all required scopes to make this call."),
        404: ("OBJECT_NOT_FOUND", "resource not found"),
        423: ("LOCKED", "The resource is locked by a high-volume operation; retry after 2 seconds."),
        477: ("MIGRATION_IN_PROGRESS", "This account is being migrated; retry later."),
        500: ("INTERNAL_ERROR", "internal error"),
        502: ("BAD_GATEWAY", "Bad gateway"),
        503: ("SERVICE_UNAVAILABLE", "Service unavailable"),
        504: ("GATEWAY_TIMEOUT", "Gateway timeout"),
    }
    category, message = table.get(status, ("INTERNAL_ERROR", "HTTP %d" % status))
    return ApiError(status, category, message).body


# ----------------------------------------------------------------------------
# Admin API
# ----------------------------------------------------------------------------

def admin_type(acct, name):
    otype = acct.object_type(name)
    if otype is None:
        raise AdminError(404, "unknown object type %s" % name)
    return otype


def admin_route(acct, method, parts, params, payload):
    """Dispatch /__admin/...; returns (status, JSON-able result)."""
    head = parts[0] if parts else ""
    n = len(parts)
    key = (method, head)
    if key == ("GET", ""):
        return 200, ADMIN_HELP
    if head == "records" and n >= 2:
        return admin_records(acct, method, admin_type(acct, parts[1]), parts[2:], params, payload)
    if key == ("POST", "restore") and n == 3:
        otype = admin_type(acct, parts[1])
        return 200, admin_view(otype, acct.restore(otype.name, parts[2]))
    if key == ("POST", "merge") and n == 2:
        otype = admin_type(acct, parts[1])
        rec = acct.merge(otype.name, str(payload.get("primaryObjectId")), str(payload.get("objectIdToMerge")),
                         admin=True)
        return 200, admin_view(otype, rec)
    if key == ("POST", "bulk_update") and n == 2:
        otype = admin_type(acct, parts[1])
        ids, count = payload.get("ids"), payload.get("count")
        if (ids is None) == (count is None):
            raise AdminError(400, "give exactly one of ids or count")
        at = parse_admin_dt(payload["at"]) if payload.get("at") else None
        return 200, acct.bulk_update(otype.name, ids, count, payload.get("properties") or {}, at)
    if head == "associations":
        return admin_associations(acct, method, parts[1:], payload)
    if key == ("GET", "association_types"):
        return 200, [{"typeId": t.type_id, "fromType": t.from_type, "toType": t.to_type, "category": t.category,
                      "label": t.label, "inverse": t.inverse.type_id} for t in ASSOC_TYPES]
    if key == ("POST", "search_lag"):
        with acct.lock:
            acct.search_lag = float(payload.get("seconds", acct.search_lag))
            return 200, {"seconds": acct.search_lag}
    if key == ("POST", "flush_index"):
        return 200, {"flushed": acct.flush_index(everything=True)}
    if key == ("POST", "search_limits"):
        with acct.lock:
            for k in acct.search_limits:
                if k in payload:
                    acct.search_limits[k] = int(payload[k])
            return 200, dict(acct.search_limits)
    if key == ("GET", "dump"):
        return 200, admin_dump(acct)
    if head == "properties":
        return admin_properties(acct, method, parts[1:], payload)
    if key == ("POST", "expire_tokens"):
        with acct.lock:
            past = acct.now() - timedelta(seconds=1)
            for info in acct.tokens.values():
                info["expires"] = min(info["expires"], past)
            return 200, {"expired": len(acct.tokens)}
    if key == ("POST", "token_lifetime"):
        with acct.lock:
            acct.token_lifetime = float(payload.get("seconds", acct.token_lifetime))
            return 200, {"seconds": acct.token_lifetime}
    if key == ("POST", "limits"):
        return 200, admin_limits(acct, payload)
    if key == ("GET", "stats"):
        return 200, admin_stats(acct)
    if head == "faults":
        return admin_faults(acct, method, payload)
    if head == "requests":
        with acct.lock:
            if method == "DELETE":
                cleared = len(acct.request_log)
                acct.request_log = []
                return 200, {"cleared": cleared}
            if method == "GET":
                return 200, list(acct.request_log)
    if key == ("POST", "clock"):
        with acct.lock:
            old = acct.clock_offset
            if "now" in payload:
                acct.clock_offset = (parse_admin_dt(payload["now"]) - datetime.now(UTC)).total_seconds()
            elif "offset" in payload:
                acct.clock_offset = float(payload["offset"])
            if acct.clock_offset < old:
                # Moving the clock back: pending writes keep the lag they had left, rather
                # than waiting for the clock to catch up with their write time.
                back = timedelta(seconds=old - acct.clock_offset)
                acct.pending = collections.deque((t - back, *rest) for t, *rest in acct.pending)
            return 200, {"now": fmt_instant(acct.now()), "offset": acct.clock_offset}
    if key == ("POST", "reset"):
        return 200, admin_reset(acct, payload)
    if head == "webhook_target" and n == 1:
        if method == "POST":
            return 200, acct.set_webhook_target(payload)
        if method == "GET":
            with acct.lock:
                return 200, dict(acct.webhook_target) if acct.webhook_target else None
        if method == "DELETE":
            return 200, {"deleted": acct.drop_webhook_target()}
    if (method, parts) == ("POST", ["webhooks", "send"]):
        return 200, admin_webhook_send(acct, payload)
    shared = webhook_admin(acct.webhooks, method, parts, payload, AdminError)
    if shared is not None:
        return shared
    raise AdminError(404, "no admin endpoint %s /__admin/%s" % (method, "/".join(parts)))


def admin_webhook_send(acct, payload):
    """One crafted delivery (tampered, stale, replayed...), sent now; returns what the receiver said."""
    if not isinstance(payload, dict):
        raise AdminError(400, "body {url?, client_secret?, body?, events?, timestamp?, signature?, method?}")
    with acct.lock:
        target = acct.webhook_target or {}
        url = payload.get("url") or target.get("url")
        secret = payload.get("client_secret") or target.get("client_secret") or acct.cfg.client_secret
        if not url:
            raise AdminError(400, "no url given and no webhook target to take it from")
        if isinstance(payload.get("body"), str):
            body = payload["body"].encode()
        else:
            events = payload.get("events")
            if events is None:
                acct.webhook_event_seq += 1
                events = [{"eventId": acct.webhook_event_seq, "subscriptionId": WEBHOOK_FIRST_SUBSCRIPTION_ID + 1,
                           "portalId": acct.cfg.portal_id, "appId": target.get("app_id", WEBHOOK_APP_ID),
                           "occurredAt": to_ms(acct.now()), "subscriptionType": "contact.propertyChange",
                           "attemptNumber": 0, "objectId": int(acct.order["contacts"][0]) if acct.order["contacts"]
                           else 1, "changeSource": "CRM_UI", "propertyName": "firstname",
                           "propertyValue": "Crafted"}]
            body = json.dumps(events, separators=(",", ":"), ensure_ascii=False).encode()
    ts = payload.get("timestamp")
    ts = int(time.time() * 1000) if ts is None else int(ts)
    headers = hubspot_webhook_headers(url, body, secret, ts, signature=payload.get("signature"),
                                      method=payload.get("method") or "POST")
    try:
        ids = [e["eventId"] for e in json.loads(body)]
    except (ValueError, TypeError, KeyError):
        ids = []
    status, text = acct.webhooks.send_now(url, body, headers, {"event_ids": ids})
    return {"status": status, "response_body": text, "headers": headers, "body": body.decode("utf-8", "replace")}


def admin_records(acct, method, otype, rest, params, payload):
    tname = otype.name
    at = parse_admin_dt(payload["at"]) if isinstance(payload, dict) and payload.get("at") else None
    if method == "POST" and not rest:
        rec = acct.create(tname, payload.get("properties") or {}, at=at, admin=True)
        return 201, admin_view(otype, rec)
    if method == "GET" and not rest:
        with acct.lock:
            now = acct.now()
            if params.get("all") == "1":
                recs = list(acct.records[tname].values())
            elif params.get("archived") == "1":
                recs = [r for r in acct.records[tname].values() if in_bin(r, now)]
            else:
                recs = [r for r in acct.records[tname].values() if visible(r)]
        return 200, [admin_view(otype, r) for r in sorted(recs, key=lambda r: int(r["id"]))]
    if len(rest) != 1:
        raise AdminError(404, "no such records endpoint")
    rec_id = rest[0]
    if method == "GET":
        with acct.lock:
            rec = acct.records[tname].get(rec_id)
        if rec is None:
            raise AdminError(404, "no %s record %s" % (tname, rec_id))
        return 200, admin_view(otype, rec)
    if method == "PATCH":
        rec = acct.update(tname, rec_id, payload.get("properties") or {}, bump=params.get("bump", "1") != "0",
                          at=at, admin=True)
        return 200, admin_view(otype, rec)
    if method == "DELETE":
        if params.get("hard") == "1":
            acct.purge(tname, rec_id)
            return 200, {"id": rec_id, "archived": False, "archivedAt": None, "hard": True}
        rec = acct.archive(tname, rec_id, admin=True)
        return 200, {"id": rec["id"], "archived": True, "archivedAt": fmt_instant(rec["archivedAt"]), "hard": False}
    raise AdminError(405, "records: GET, POST, PATCH or DELETE")


def admin_associations(acct, method, rest, payload):
    if method == "GET" and len(rest) == 3:
        ftype, ttype = admin_type(acct, rest[0]), admin_type(acct, rest[2])
        with acct.lock:
            return 200, [{"toObjectId": tid, "typeIds": [t.type_id for t in types]}
                         for tid, types in acct.links_of(ftype.name, rest[1], ttype.name)]
    if method in ("PUT", "DELETE") and not rest:
        try:
            ftype, ttype = admin_type(acct, payload["fromType"]), admin_type(acct, payload["toType"])
            fid, tid = str(payload["fromId"]), str(payload["toId"])
        except KeyError as e:
            raise AdminError(400, "missing %s" % e)
        return 200, acct.set_association(ftype.name, fid, ttype.name, tid, payload.get("typeId"),
                                         remove=method == "DELETE")
    raise AdminError(404, "associations: GET /{fromType}/{id}/{toType}, PUT or DELETE")


def admin_properties(acct, method, rest, payload):
    """Schema drift: add a property, or archive one (it leaves objects and search)."""
    if method == "POST" and len(rest) == 1:
        otype = admin_type(acct, rest[0])
        name, ptype = payload.get("name"), payload.get("type")
        field_type = payload.get("fieldType") or (FIELD_TYPES.get(ptype) or ("text",))[0]
        if not name or ptype not in TYPES or field_type not in FIELD_TYPES[ptype]:
            raise AdminError(400, "need name, type in %s and a fieldType that fits it" % (TYPES,))
        with acct.lock:
            if otype.live_prop(name):
                raise AdminError(409, "property %s exists" % name)
            otype.props[name] = Prop(name, ptype, field_type, payload.get("label"), options=payload.get("options"),
                                     hubspot_defined=False, created=acct.now())
            return 201, otype.props[name].describe()
    if method == "DELETE" and len(rest) == 2:
        otype = admin_type(acct, rest[0])
        with acct.lock:
            prop = otype.live_prop(rest[1])
            if prop is None or prop.hubspot_defined:
                raise AdminError(400, "no archivable property %s" % rest[1])
            prop.archived_at = acct.now()
            return 200, {"archived": prop.name}
    raise AdminError(404, "properties: POST /{type} or DELETE /{type}/{name}")


def admin_limits(acct, payload):
    with acct.lock:
        lim = acct.limiter
        if "daily_used" in payload:
            lim.roll_day(acct.now())
            lim.daily_used = int(payload["daily_used"])
        if "daily_max" in payload:
            lim.daily_max = int(payload["daily_max"])
        if "burst_max" in payload:
            lim.burst_max["private"] = int(payload["burst_max"])
        if "oauth_burst_max" in payload:
            lim.burst_max["oauth"] = int(payload["oauth_burst_max"])
        if "search_per_second" in payload:
            lim.search_per_second = int(payload["search_per_second"])
        if "tz_offset_minutes" in payload:
            lim.tz_offset = timedelta(minutes=int(payload["tz_offset_minutes"]))
        if payload.get("reset_windows"):
            lim.reset_windows()
        return {"daily_used": lim.daily_used, "daily_max": lim.daily_max, "burst_max": lim.burst_max["private"],
                "oauth_burst_max": lim.burst_max["oauth"], "search_per_second": lim.search_per_second,
                "tz_offset_minutes": int(lim.tz_offset.total_seconds() // 60)}


def admin_stats(acct):
    with acct.lock:
        now = acct.now()
        return {
            "requests": dict(acct.endpoint_counts), "total_requests": sum(acct.endpoint_counts.values()),
            "usage": {"daily_used": acct.limiter.daily_used, "daily_max": acct.limiter.daily_max},
            "tokens_issued": acct.tokens_issued, "search_lag": acct.search_lag,
            "pending_index": len(acct.pending),
            "records": {t: sum(1 for r in recs.values() if visible(r)) for t, recs in acct.records.items()},
            "archived": {t: sum(1 for r in recs.values() if in_bin(r, now)) for t, recs in acct.records.items()},
            "merged": {t: len(a) for t, a in acct.aliases.items()},
        }


def admin_dump(acct):
    with acct.lock:
        objects = {t: [admin_view(acct.types[t], r) for r in sorted(recs.values(), key=lambda r: int(r["id"]))]
                   for t, recs in acct.records.items()}
        assoc = [{"fromType": f, "fromId": fid, "toType": to, "toId": tid, "typeIds": sorted(types)}
                 for (f, fid, to), targets in sorted(acct.assoc.items()) for tid, types in sorted(targets.items())
                 if types]
        return {"now": fmt_instant(acct.now()), "objects": objects, "associations": assoc,
                "aliases": {t: dict(a) for t, a in acct.aliases.items()}}


def admin_reset(acct, payload):
    cfg = acct.cfg
    with acct.lock:
        acct.drop_webhook_target()
        acct.webhooks.reset()
        acct.seed_data(int(payload.get("contacts", cfg.contacts)), int(payload.get("companies", cfg.companies)),
                       int(payload.get("deals", cfg.deals)), int(payload.get("cars", cfg.cars)),
                       int(payload.get("archived", cfg.archived)), int(payload.get("seed", cfg.seed)))
        acct.faults, acct.request_log, acct.endpoint_counts = [], [], {}
        acct.limiter = Limiter(cfg)
        acct.clock_offset, acct.search_lag, acct.token_lifetime = 0.0, cfg.search_lag, cfg.token_lifetime
        acct.search_limits = {"max_groups": 5, "max_filters_per_group": 6, "max_filters_total": 18}
        return {"records": {t: len(r) for t, r in acct.records.items()}}


def admin_faults(acct, method, payload):
    with acct.lock:
        if method == "GET":
            return 200, acct.faults
        if method == "DELETE":
            cleared = len(acct.faults)
            acct.faults = []
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
    p = argparse.ArgumentParser(description="Fake HubSpot CRM API for sync's tests")
    p.add_argument("--port", type=int, default=0, help="0 = pick a free port (printed)")
    p.add_argument("--contacts", type=int, default=1000, help="live contacts to seed")
    p.add_argument("--companies", type=int, default=100)
    p.add_argument("--deals", type=int, default=300)
    p.add_argument("--cars", type=int, default=50, help="records of the custom object (2-1234567)")
    p.add_argument("--archived", type=int, default=10, help="extra contacts seeded into the recycle bin")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--base-time", default="2025-03-01T00:00:00Z",
                   help="seeded stamps end before this ISO time ('now' = current hour)")
    p.add_argument("--search-lag", type=float, default=5.0, help="seconds before a write is searchable")
    p.add_argument("--token-lifetime", type=float, default=1800, help="OAuth access token lifetime, seconds")
    p.add_argument("--burst-limit", type=int, default=190, help="private app requests per 10 s")
    p.add_argument("--oauth-burst-limit", type=int, default=110, help="OAuth app requests per 10 s")
    p.add_argument("--daily-limit", type=int, default=625000, help="private-app requests per day")
    p.add_argument("--search-rate", type=int, default=5, help="search requests per second (account)")
    p.add_argument("--private-app-token", default="pat-na1-11111111-2222-3333-4444-555555555555")
    p.add_argument("--client-id", default="test-client")
    p.add_argument("--client-secret", default="test-secret")
    p.add_argument("--refresh-token", default="test-refresh")
    p.add_argument("--portal-id", type=int, default=62515)
    p.add_argument("--verbose", action="store_true", help="log requests to stderr")
    cfg = p.parse_args(argv)
    if cfg.base_time == "now":
        cfg.base_time = None
    else:
        cfg.base_time = parse_iso(cfg.base_time)
        if cfg.base_time is None:
            p.error("--base-time must be ISO-8601 with a zone, or 'now'")
    return cfg


def main(argv=None):
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    account = Account(cfg)
    Handler.account = account
    Handler.verbose = cfg.verbose
    server = Server(("127.0.0.1", cfg.port), Handler)
    port = server.server_address[1]
    account.base_url = "http://127.0.0.1:%d" % port
    print("listening on %d" % port, flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
