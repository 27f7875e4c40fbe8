#!/usr/bin/python3
"""Fake Salesforce REST API for the `sync` test suite (Python 3.11, stdlib only).

Run:  /usr/bin/python3 test/fake_salesforce.py --port 0 [--records 5000] [--seed 1]
      [--accounts N] [--deleted N] [--base-time ISO|now] [--token-lifetime S]
      [--daily-limit N] [--client-id ..] [--client-secret ..] [--refresh-token ..]
      [--render-cache RECORDS] [--query-gzip-level 1-9] [--verbose]
Prints "listening on PORT" once ready (stdout, flushed). Binds 127.0.0.1 only.

Imitates one org as strictly as we know how: OAuth refresh-token flow, versioned REST
paths (v31.0..v67.0), describeGlobal/describe, SOQL query/queryAll with query locators,
sObject Get Deleted/Updated, Bulk API 2.0 query jobs (jobs/query, CSV results paged by
Sforce-Locator; see the "Bulk API 2.0" section), limits, the daily API allocation, and
Salesforce's error bodies (a JSON array of {message, errorCode}). Every response has a Date header (the
server clock, shiftable via /__admin/clock); /services/data responses carry
Sforce-Limit-Info. Bodies above 1 KB are gzipped when the client sends Accept-Encoding: gzip.

Query listings are served from caches (same bytes; Org.query_result, Org.page,
Handler.page_answer): a query's ordered result per SOQL text, each record's JSON, and each
page's records array with its pre-compressed deflate piece (a gzip answer is spliced around
it; zlib level --query-gzip-level, default 1), each up to --render-cache records (default
300,000). Any write invalidates what it touches: never a stale answer.

Seeded data (deterministic per --seed): Accounts, Contacts, ContactHistory; custom
objects (Widget__c ...) come from POST /__admin/objects, seeded from the same seed. Contact
SystemModstamps come in bursts sharing one second: the first 300 contacts (creation
order) share one; with >= 4500 contacts a burst of 2100 shares another (more than one
2000-record page). All seeded stamps end 1 h before --base-time (default
2025-03-01T00:00:00Z, so seeded data is stable across runs). Writes use the current
clock, truncated to whole seconds.

Behaviour worth knowing:
  * getDeleted/getUpdated truncate start/end to the minute and never report
    latestDateCovered later than the current minute, so a delete made "now" shows up
    only once the clock has moved to the next minute (tests: POST /__admin/clock).
  * Query locators keep the id list fixed at query time; values are read when a page
    is served and rows deleted since are skipped (pages can come back short).
  * Bulk API 2.0 query jobs: UploadComplete -> InProgress (the result set is snapshotted
    then) -> JobComplete after delays set by POST /__admin/bulk. Results are CSV with every
    field quoted ("" = null), rows in creation order unless ORDER BY; each job counts against
    DailyBulkV2QueryJobs (10,000 per rolling 24 h) and every call against the daily API
    allocation. Seeding and serialising are tuned for 1,000,000 records.
  * Account_Name__c is a cross-object formula: renaming the Account changes it
    without bumping the Contact's SystemModstamp. Legacy_Region__c is
    deprecatedAndHidden (in describe, invisible to SOQL).

Request log (GET /__admin/requests): one entry per API request, token endpoint included,
in completion order; `t` is the epoch second (float) at which the request line arrived,
so sort by `t` for arrival order.

/__admin/ is the test-control API (JSON in/out, no auth, not counted, not logged);
GET /__admin/ lists every endpoint with its shape (ADMIN_HELP below).
"""

import argparse
import base64
import bisect
import csv
import email.utils
import gc
import gzip
import hashlib
import heapq
import hmac
import json
import random
import re
import secrets
import socket
import struct
import sys
import threading
import time
import traceback
import zlib
from itertools import accumulate
from operator import is_, itemgetter
from array import array
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit

from fakelib import FAULT_HELP, FaultDelivery, fault_on_real_answer, fault_pick, make_fault

UTC = timezone.utc
MIN_VERSION, MAX_VERSION = 31, 67
DEFAULT_BATCH, MIN_BATCH, MAX_BATCH = 2000, 200, 2000
LOCATOR_LIFETIME = timedelta(days=2)        # query cursors live 2 days since v56
DELETED_WINDOW_DAYS = 15                    # getDeleted looks back at most 15 days
UPDATED_WINDOW_DAYS = 30                    # getUpdated looks back at most 30 days
MAX_REPLICATION_IDS = 600000
MAX_URI_BYTES = 16384
JSON_TYPE = "application/json;charset=UTF-8"

ADMIN_HELP = {
    "POST /__admin/records/{Obj}": "body {Field: value} -> 201 record (server sets Id, CreatedDate, "
                                   "LastModifiedDate, SystemModstamp = now unless given)",
    "GET /__admin/records/{Obj}[?include_deleted=1]": "-> [record, ...] sorted by Id",
    "GET /__admin/records/{Obj}/{Id}": "-> record (also soft-deleted ones)",
    "PATCH /__admin/records/{Obj}/{Id}[?bump=0]": "body {Field: value} -> record; bump=0 keeps "
                                                  "SystemModstamp (like a formula change)",
    "DELETE /__admin/records/{Obj}/{Id}[?hard=1]": "-> {id, deletedDate, hard}",
    "POST /__admin/bulk_update/{Obj}": "body {ids:[...]|count:N, fields:{...}} -> {ids, SystemModstamp}",
    "POST /__admin/undelete/{Obj}/{Id}": "-> record",
    "POST /__admin/empty_recycle_bin": "-> {purged: N}",
    "GET /__admin/delete_log": "-> [{object, id, deletedDate}]",
    "POST /__admin/expire_tokens": "-> {expired: N}",
    "POST /__admin/expire_locators": "-> {expired: N}",
    "POST /__admin/set_earliest_deleted": "body {at: ISO, mode: 'error'|'report'} -> {earliestDateAvailable, mode}",
    "POST /__admin/faults": FAULT_HELP,
    "GET /__admin/faults": "-> [fault, ...]",
    "DELETE /__admin/faults": "-> {cleared: N}",
    "GET /__admin/requests": "-> [{t, method, path, query, status}] in completion order; t = epoch "
                             "seconds (float) when the request arrived; admin calls are not logged",
    "DELETE /__admin/requests": "-> {cleared: N}",
    "GET /__admin/stats": "-> {requests: {endpoint: n}, api_usage: {used, max}, ...}",
    "POST /__admin/limits": "body {used?, max?} -> {used, max}",
    "POST /__admin/query_options": "body {page_cap: N|null} -> pages hold at most N records "
                                   "whatever batchSize says",
    "POST /__admin/clock": "body {offset: seconds} or {now: ISO} -> {now, offset}",
    "POST /__admin/fields/{Obj}": "body {name, type, label?, length?, precision?, scale?, "
                                  "picklistValues?} -> describe of the new field",
    "DELETE /__admin/fields/{Obj}/{Field}": "-> {removed: name}",
    "POST /__admin/objects": "body {name: 'Widget__c', records?: N=0, label?, labelPlural?} -> 201 "
                             "{name, label, labelPlural, keyPrefix, records, fields}: a custom sObject "
                             "(fields Id, OwnerId, IsDeleted, Name, audit fields, Amount__c, Quantity__c, "
                             "Status__c, Notes__c), N records seeded from --seed, stamped before "
                             "--base-time; 400 if the name is taken or not a custom API name",
    "GET /__admin/objects": "-> [{name, label, labelPlural, keyPrefix, records, fields}] (custom objects)",
    "DELETE /__admin/objects/{Name}": "-> {removed, records}: the object, its records, delete log and "
                                      "query locators are gone (API: INVALID_TYPE / NOT_FOUND)",
    "POST /__admin/reset": "body {records?, accounts?, seed?, deleted?} -> {records: {...}} "
                           "(custom objects are dropped; Bulk jobs and settings too)",
    "GET /__admin/bulk": "-> {settings, fail_next_jobs, daily_jobs: {used, max}, daily_storage_mb: "
                         "{used, max}, jobs: [{id, state, operation, object, query, apiVersion, records, "
                         "bytes, errorMessage}]}",
    "POST /__admin/bulk": "body (all optional) {queue_delay_s=0.1 (UploadComplete -> InProgress, the "
                          "snapshot instant), processing_delay_s=0.2 (InProgress -> JobComplete, at least), "
                          "fail_next_job: 'message' (next job(s) end Failed with this errorMessage; null "
                          "cancels), fail_count=1, default_max_records=null (results rows when maxRecords "
                          "is absent; null = all), max_records_cap=null (larger maxRecords are lowered), "
                          "max_bytes=1073741824 (bytes per results response, whole rows, at least one), "
                          "quote_all=true (false: RFC 4180 minimal quoting, null = empty unquoted), "
                          "retries=0 (reported in job info), gzip=true (false: results never "
                          "compressed), gzip_block_rows=2000 (rows per pre-compressed block), "
                          "jobs_max=10000, jobs_used (DailyBulkV2QueryJobs "
                          "used, as if created now), storage_max_mb, storage_used_mb} -> GET /__admin/bulk",
    "POST /__admin/bulk/expire": "-> {expired: N}: every job is gone (like the 7-day cleanup): 404 after",
    "POST /__admin/bulk/reset": "-> default settings, no jobs, fresh daily allocation",
}


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------

class ApiError(Exception):
    """A Salesforce REST error: status plus the array body Salesforce sends."""

    def __init__(self, status, code, message, headers=None):
        super().__init__(message)
        self.status = status
        self.body = [{"message": message, "errorCode": code}]
        self.headers = headers or {}


class OAuthError(Exception):
    """An OAuth endpoint error: {"error", "error_description"} body."""

    def __init__(self, status, error, description):
        super().__init__(description)
        self.status = status
        self.body = {"error": error, "error_description": description}


class AdminError(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def not_found():
    return ApiError(404, "NOT_FOUND", "The requested resource does not exist")


def invalid_session():
    return ApiError(401, "INVALID_SESSION_ID", "Session expired or invalid",
                    {"WWW-Authenticate": "Token"})


# ----------------------------------------------------------------------------
# Time helpers (everything is UTC)
# ----------------------------------------------------------------------------

def fmt_dt(dt):
    """Salesforce wire form of a datetime: 2024-05-01T12:34:56.000+0000."""
    if dt.year >= 1000:        # fast path (strftime is slow; seeding 1,000,000 records calls this 3M times)
        return "%04d-%02d-%02dT%02d:%02d:%02d.%03d+0000" % (dt.year, dt.month, dt.day, dt.hour, dt.minute,
                                                             dt.second, dt.microsecond // 1000)
    return "%s.%03d+0000" % (dt.strftime("%Y-%m-%dT%H:%M:%S"), dt.microsecond // 1000)


ISO_RE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
                    r"(Z|[+-]\d{2}:?\d{2})$")


def parse_iso(text):
    """Parse an ISO-8601 datetime with an explicit zone; None when malformed."""
    m = ISO_RE.match(text or "")
    if not m:
        return None
    y, mo, d, h, mi, s, frac, zone = m.groups()
    try:
        dt = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s),
                      int((frac or "0").ljust(6, "0")[:6]), tzinfo=UTC)
    except ValueError:
        return None
    if zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        digits = zone[1:].replace(":", "")
        hours, minutes = int(digits[:2]), int(digits[2:])
        if hours > 23 or minutes > 59:
            return None
        dt -= sign * timedelta(hours=hours, minutes=minutes)
    return dt


def parse_any_dt(text):
    """Datetime from wire form or ISO (admin input); raises AdminError."""
    dt = parse_iso(text) if isinstance(text, str) else None
    if dt is None:
        raise AdminError(400, "bad datetime %r (want e.g. 2024-05-01T12:00:00Z)" % (text,))
    return dt


def floor_minute(dt):
    return dt.replace(second=0, microsecond=0)


# ----------------------------------------------------------------------------
# Salesforce ids
# ----------------------------------------------------------------------------

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
ID_RE = re.compile(r"^[A-Za-z0-9]{15}(?:[A-Za-z0-9]{3})?$")


SUFFIX_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"
UPPER_BITS = str.maketrans({chr(c): "1" if 65 <= c <= 90 else "0" for c in range(128)})


def id_suffix(id15):
    """The 3-char case-safe suffix: one char per 5-char chunk encoding which chars are upper case
    (bit j set when char j of the chunk is A-Z)."""
    mask = id15[:15].translate(UPPER_BITS)[::-1]          # char 14 first: int(..., 2) reads bit 0 last
    return (SUFFIX_CHARS[int(mask[10:15], 2)] + SUFFIX_CHARS[int(mask[5:10], 2)]
            + SUFFIX_CHARS[int(mask[0:5], 2)])


def to_id18(text):
    return text + id_suffix(text) if len(text) == 15 else text


class FastDraw:
    """choice/randint/randrange drawing exactly what random.Random's methods draw (same calls to
    getrandbits, so the same stream and results), with one Python frame per draw instead of
    three: seeding 1,000,000 records makes ~40M draws. Falls back to the stdlib methods if this
    Python's random module draws differently (checked once, see fast_draw_matches_stdlib)."""

    def __init__(self, rng):
        self.rng = rng
        if not FAST_DRAW_OK:
            self.choice, self.randint, self.randrange = rng.choice, rng.randint, rng.randrange
            return
        getrandbits = rng.getrandbits

        def choice(seq):
            n = len(seq)
            k = n.bit_length()
            r = getrandbits(k)
            while r >= n:
                r = getrandbits(k)
            return seq[r]

        def randint(a, b):
            n = b - a + 1
            k = n.bit_length()
            r = getrandbits(k)
            while r >= n:
                r = getrandbits(k)
            return a + r

        def randrange(n):
            k = n.bit_length()
            r = getrandbits(k)
            while r >= n:
                r = getrandbits(k)
            return r

        self.choice, self.randint, self.randrange = choice, randint, randrange


def fast_draw_matches_stdlib():
    global FAST_DRAW_OK
    FAST_DRAW_OK = True
    a, b = random.Random(12345), random.Random(12345)
    fast = FastDraw(b)
    for n in (1, 2, 3, 5, 31, 62, 63, 64, 65, 1000, 999999, 400 * 86400 + 1):
        seq = range(n)
        for _ in range(50):
            if (a.choice(seq), a.randint(7, 7 + n), a.randrange(n)) != \
                    (fast.choice(seq), fast.randint(7, 7 + n), fast.randrange(n)):
                return False
    return a.random() == b.random()


FAST_DRAW_OK = False
FAST_DRAW_OK = fast_draw_matches_stdlib()


class IdFactory:
    """Deterministic, unique 18-char ids: prefix + pod 'Hp' + '0' + 9 random base62 chars + suffix."""

    def __init__(self, rng):
        self.rng = rng
        self.used = set()
        self.choice = FastDraw(rng).choice
        self.getrandbits = rng.getrandbits if FAST_DRAW_OK else None

    def new(self, prefix):
        gb = self.getrandbits
        while True:
            if gb is None:
                chars = "".join([self.choice(BASE62) for _ in range(9)])
            else:
                # choice(BASE62) nine times, inlined: 62 needs 6 bits, redraw 62 and 63
                out = []
                for _ in range(9):
                    r = gb(6)
                    while r >= 62:
                        r = gb(6)
                    out.append(BASE62[r])
                chars = "".join(out)
            body = prefix + "Hp0" + chars
            if body not in self.used:
                self.used.add(body)
                return body + id_suffix(body)


# ----------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------

SOAP_TYPES = {
    "id": "tns:ID", "reference": "tns:ID", "boolean": "xsd:boolean", "int": "xsd:int",
    "double": "xsd:double", "currency": "xsd:double", "percent": "xsd:double",
    "date": "xsd:date", "datetime": "xsd:dateTime", "time": "xsd:time",
    "address": "urn:address", "anyType": "xsd:anyType",
}
TEXT_TYPES = {"string", "textarea", "email", "phone", "url", "picklist", "combobox",
              "multipicklist", "encryptedstring"}
NUMBER_TYPES = {"int", "double", "currency", "percent"}
DEFAULT_LENGTH = {"id": 18, "reference": 18, "string": 255, "textarea": 255, "email": 80,
                  "phone": 40, "url": 255, "picklist": 255, "multipicklist": 4099,
                  "combobox": 255, "anyType": 0}
ADDRESS_PARTS = [("city", "City"), ("country", "Country"), ("geocodeAccuracy", "GeocodeAccuracy"),
                 ("latitude", "Latitude"), ("longitude", "Longitude"), ("postalCode", "PostalCode"),
                 ("state", "State"), ("street", "Street")]


class Field:
    """One sObject field: describe metadata plus how to read its value from a record."""

    def __init__(self, name, ftype, label=None, length=None, precision=0, scale=0,
                 nillable=True, picklist=None, reference_to=None, relationship=None,
                 compound=None, custom=None, calculated=False, formula=None, createable=True,
                 updateable=True, filterable=None, sortable=None, hidden=False,
                 external_id=False, unique=False, name_field=False, defaulted=False,
                 default_value=None, getter=None):
        self.name = name
        self.type = ftype
        self.label = label or re.sub(r"__c$", "", name).replace("_", " ")
        self.length = length if length is not None else DEFAULT_LENGTH.get(ftype, 0)
        self.precision = precision
        self.scale = scale
        self.nillable = nillable
        self.picklist = picklist or []
        self.reference_to = reference_to or []
        self.relationship = relationship
        self.compound = compound
        self.custom = name.endswith("__c") if custom is None else custom
        self.calculated = calculated
        self.formula = formula
        self.createable = createable and not calculated
        self.updateable = updateable and not calculated
        long_text = ftype == "textarea" and self.length > 255
        if filterable is None:
            filterable = ftype not in ("address", "anyType") and not long_text
        if sortable is None:
            sortable = ftype not in ("address", "anyType", "multipicklist") and not long_text
        self.filterable = filterable
        self.sortable = sortable
        self.hidden = hidden
        self.external_id = external_id
        self.unique = unique
        self.name_field = name_field
        self.defaulted = defaulted
        self.default_value = default_value
        # getter(record) -> wire value; plain fields read the record dict.
        self.getter = getter or (lambda rec, n=name: rec.get(n))
        self.plain = getter is None          # value is rec[name] (Bulk CSV reads those column-wise)

    def describe(self):
        t = self.type
        text = t in TEXT_TYPES or t in ("id", "reference")
        return {
            "aggregatable": self.sortable,
            "aiPredictionField": False,
            "autoNumber": False,
            "byteLength": self.length * 3 if text and t not in ("id", "reference") else self.length,
            "calculated": self.calculated,
            "calculatedFormula": self.formula,
            "cascadeDelete": False,
            "caseSensitive": False,
            "compoundFieldName": self.compound,
            "controllerName": None,
            "createable": self.createable,
            "custom": self.custom,
            "defaultValue": self.default_value,
            "defaultValueFormula": None,
            "defaultedOnCreate": self.defaulted,
            "dependentPicklist": False,
            "deprecatedAndHidden": self.hidden,
            "digits": 9 if t == "int" else 0,
            "displayLocationInDecimal": False,
            "encrypted": False,
            "externalId": self.external_id,
            "extraTypeInfo": None,
            "filterable": self.filterable,
            "filteredLookupInfo": None,
            "formulaTreatNullNumberAsZero": False,
            "groupable": self.sortable and t not in NUMBER_TYPES,
            "highScaleNumber": False,
            "htmlFormatted": False,
            "idLookup": t == "id" or self.external_id,
            "inlineHelpText": None,
            "label": self.label,
            "length": self.length if text else 0,
            "mask": None,
            "maskType": None,
            "name": self.name,
            "nameField": self.name_field,
            "namePointing": False,
            "nillable": self.nillable,
            "permissionable": self.nillable and not self.calculated and t != "id",
            "picklistValues": [{"active": True, "defaultValue": False, "label": v,
                                "validFor": None, "value": v} for v in self.picklist],
            "polymorphicForeignKey": False,
            "precision": self.precision if t in ("double", "currency", "percent") else 0,
            "queryByDistance": False,
            "referenceTargetField": None,
            "referenceTo": self.reference_to,
            "relationshipName": self.relationship,
            "relationshipOrder": None,
            "restrictedDelete": False,
            "restrictedPicklist": False,
            "scale": self.scale if t in ("double", "currency", "percent") else 0,
            "searchPrefilterable": t == "reference",
            "soapType": SOAP_TYPES.get(t, "xsd:string"),
            "sortable": self.sortable,
            "type": t,
            "unique": self.unique,
            "updateable": self.updateable,
            "writeRequiresMasterRead": False,
        }


class SObjectType:
    def __init__(self, name, label, key_prefix, fields, queryable=True, replicateable=True,
                 retrieveable=True, custom=False, label_plural=None, createable=True):
        self.name = name
        self.label = label
        self.label_plural = label_plural or label + "s"
        self.key_prefix = key_prefix
        self.queryable = queryable
        self.replicateable = replicateable
        self.retrieveable = retrieveable
        self.createable = createable
        self.custom = custom
        self.fields = fields
        self.records = {}          # Id -> record dict (replaced, never mutated: readers need no lock)
        self.schema_changed = datetime(2024, 1, 1, tzinfo=UTC)
        self._describe_cache = {}
        self.reindex()

    def reindex(self):
        self.by_lower = {f.name.lower(): f for f in self.fields}
        self._describe_cache.clear()

    def field(self, name):
        """Case-insensitive lookup; deprecatedAndHidden fields are invisible to queries."""
        f = self.by_lower.get(name.lower())
        return None if f is None or f.hidden else f

    def global_entry(self, version):
        base = "/services/data/v%s/sobjects/%s" % (version, self.name)
        return {
            "activateable": False, "associateEntityType": None, "associateParentEntity": None,
            "createable": self.createable, "custom": self.custom, "customSetting": False,
            "deepCloneable": False, "deletable": self.createable, "deprecatedAndHidden": False,
            "feedEnabled": False, "hasSubtypes": False, "isInterface": False, "isSubtype": False,
            "keyPrefix": self.key_prefix, "label": self.label, "labelPlural": self.label_plural,
            "layoutable": self.createable, "mergeable": self.createable and not self.custom,
            "mruEnabled": self.createable,
            "name": self.name, "queryable": self.queryable, "replicateable": self.replicateable,
            "retrieveable": self.retrieveable, "searchable": self.createable,
            "triggerable": self.createable, "undeletable": self.createable,
            "updateable": self.createable,
            "urls": {"rowTemplate": base + "/{ID}", "defaultValues": base + "/defaultValues?recordTypeId&fields",
                     "describe": base + "/describe", "sobject": base},
        }

    def describe_bytes(self, version):
        """Describe JSON, cached per API version until the schema changes."""
        cached = self._describe_cache.get(version)
        if cached is None:
            d = self.global_entry(version)
            d.update({
                "actionOverrides": [], "childRelationships": [], "compactLayoutable": self.createable,
                "defaultImplementation": None, "extendedBy": None, "extendsInterfaces": None,
                "fields": [f.describe() for f in self.fields], "implementedBy": None,
                "implementsInterfaces": None, "listviewable": None, "lookupLayoutable": None,
                "namedLayoutInfos": [], "networkScopeFieldName": None, "recordTypeInfos": [],
                "searchLayoutable": self.createable, "sobjectDescribeOption": "FULL",
                "supportedScopes": [{"label": "All " + self.label_plural, "name": "everything"}],
            })
            d["urls"].update({"compactLayouts": "/services/data/v%s/sobjects/%s/describe/compactLayouts"
                              % (version, self.name)})
            cached = json.dumps(d, ensure_ascii=False, separators=(",", ":")).encode()
            self._describe_cache[version] = cached
        return cached


def F(*args, **kw):
    return Field(*args, **kw)


def system_fields(obj_name):
    """Audit fields every replicateable object has."""
    return [
        F("OwnerId", "reference", "Owner ID", nillable=False, reference_to=["User"],
          relationship="Owner", defaulted=True),
        F("CreatedDate", "datetime", "Created Date", nillable=False, createable=False,
          updateable=False, defaulted=True),
        F("CreatedById", "reference", "Created By ID", nillable=False, reference_to=["User"],
          relationship="CreatedBy", createable=False, updateable=False, defaulted=True),
        F("LastModifiedDate", "datetime", "Last Modified Date", nillable=False,
          createable=False, updateable=False, defaulted=True),
        F("LastModifiedById", "reference", "Last Modified By ID", nillable=False,
          reference_to=["User"], relationship="LastModifiedBy", createable=False,
          updateable=False, defaulted=True),
        F("SystemModstamp", "datetime", "System Modstamp", nillable=False, createable=False,
          updateable=False, defaulted=True),
    ]


def address_fields(prefix, label):
    """Component fields of a compound address plus the compound field itself."""
    comp = prefix + "Address"
    return [
        F(prefix + "Street", "textarea", label + " Street", length=255, compound=comp),
        F(prefix + "City", "string", label + " City", length=40, compound=comp),
        F(prefix + "State", "string", label + " State/Province", length=80, compound=comp),
        F(prefix + "PostalCode", "string", label + " Zip/Postal Code", length=20, compound=comp),
        F(prefix + "Country", "string", label + " Country", length=80, compound=comp),
        F(prefix + "Latitude", "double", label + " Latitude", precision=18, scale=15, compound=comp),
        F(prefix + "Longitude", "double", label + " Longitude", precision=18, scale=15, compound=comp),
        F(prefix + "GeocodeAccuracy", "picklist", label + " Geocode Accuracy", length=40, compound=comp,
          picklist=["Address", "NearAddress", "Block", "Street", "ExtendedZip", "Zip",
                    "Neighborhood", "City", "County", "State", "Unknown"]),
        F(comp, "address", label + " Address", createable=False, updateable=False,
          getter=address_getter(prefix)),
    ]


def address_getter(prefix):
    keys = [(k, prefix + suffix) for k, suffix in ADDRESS_PARTS]

    def get(rec):
        value = {k: rec.get(src) for k, src in keys}
        return value if any(v is not None for v in value.values()) else None
    return get


LEAD_SOURCES = ["Web", "Phone Inquiry", "Partner Referral", "Purchased List", "Other"]
TIERS = ["Bronze", "Silver", "Gold", "Platinum"]
INTERESTS = ["Sports", "Music", "Travel", "Food & Wine", "Technology", "Art"]


def contact_type(org):
    fields = [
        F("Id", "id", "Contact ID", nillable=False, createable=False, updateable=False, defaulted=True),
        F("IsDeleted", "boolean", "Deleted", nillable=False, createable=False, updateable=False,
          defaulted=True, default_value=False),
        F("MasterRecordId", "reference", "Master Record ID", reference_to=["Contact"],
          relationship="MasterRecord", createable=False, updateable=False),
        F("AccountId", "reference", "Account ID", reference_to=["Account"], relationship="Account"),
        F("LastName", "string", "Last Name", length=80, nillable=False),
        F("FirstName", "string", "First Name", length=40),
        F("Salutation", "picklist", "Salutation", length=40,
          picklist=["Mr.", "Ms.", "Mrs.", "Dr.", "Prof.", "Mx."]),
        F("Name", "string", "Full Name", length=121, createable=False, updateable=False,
          name_field=True, nillable=False),
    ] + address_fields("Mailing", "Mailing") + [
        F("Phone", "phone", "Business Phone"),
        F("MobilePhone", "phone", "Mobile Phone"),
        F("Email", "email", "Email", external_id=False),
        F("Title", "string", "Title", length=128),
        F("Department", "string", "Department", length=80),
        F("LeadSource", "picklist", "Lead Source", picklist=LEAD_SOURCES),
        F("Birthdate", "date", "Birthdate"),
        F("Description", "textarea", "Contact Description", length=32000),
        F("HasOptedOutOfEmail", "boolean", "Email Opt Out", nillable=False, defaulted=True,
          default_value=False),
        F("DoNotCall", "boolean", "Do Not Call", nillable=False, defaulted=True, default_value=False),
    ] + system_fields("Contact") + [
        F("LastActivityDate", "date", "Last Activity", createable=False, updateable=False),
        F("EmailBouncedDate", "datetime", "Email Bounced Date"),
        F("Loyalty_Tier__c", "picklist", "Loyalty Tier", picklist=TIERS),
        F("Lifetime_Value__c", "currency", "Lifetime Value", precision=18, scale=2),
        F("Engagement_Score__c", "double", "Engagement Score", precision=5, scale=1),
        F("Discount_Rate__c", "percent", "Discount Rate", precision=5, scale=2),
        F("Visit_Count__c", "int", "Visit Count"),
        F("Interests__c", "multipicklist", "Interests", picklist=INTERESTS),
        F("Website__c", "url", "Website"),
        F("Preferred_Contact_Time__c", "time", "Preferred Contact Time"),
        F("External_Key__c", "string", "External Key", length=36, external_id=True, unique=True),
        # Cross-object formula: changes when the Account is renamed WITHOUT bumping the
        # Contact's SystemModstamp -- the classic formula-field staleness pitfall.
        F("Account_Name__c", "string", "Account Name", length=1300, calculated=True,
          formula="Account.Name", getter=lambda rec: org.account_name(rec.get("AccountId"))),
        # Shows up in describe but is invisible to SOQL, like a real deprecated field.
        F("Legacy_Region__c", "string", "Legacy Region", length=20, hidden=True),
    ]
    return SObjectType("Contact", "Contact", "003", fields)


def account_type():
    fields = [
        F("Id", "id", "Account ID", nillable=False, createable=False, updateable=False, defaulted=True),
        F("IsDeleted", "boolean", "Deleted", nillable=False, createable=False, updateable=False,
          defaulted=True, default_value=False),
        F("Name", "string", "Account Name", length=255, nillable=False, name_field=True),
        F("Type", "picklist", "Account Type",
          picklist=["Prospect", "Customer - Direct", "Customer - Channel", "Partner", "Other"]),
        F("Industry", "picklist", "Industry",
          picklist=["Agriculture", "Banking", "Education", "Energy", "Retail", "Technology"]),
    ] + address_fields("Billing", "Billing") + [
        F("Phone", "phone", "Account Phone"),
        F("Website", "url", "Website"),
        F("AnnualRevenue", "currency", "Annual Revenue", precision=18, scale=0),
        F("NumberOfEmployees", "int", "Employees"),
        F("Description", "textarea", "Account Description", length=32000),
    ] + system_fields("Account")
    return SObjectType("Account", "Account", "001", fields)


def contact_history_type():
    """Queryable but not replicateable; no SystemModstamp (history objects only have CreatedDate)."""
    fields = [
        F("Id", "id", "Contact History ID", nillable=False, createable=False, updateable=False),
        F("IsDeleted", "boolean", "Deleted", nillable=False, createable=False, updateable=False),
        F("ContactId", "reference", "Contact ID", nillable=False, reference_to=["Contact"],
          relationship="Contact", createable=False, updateable=False),
        F("CreatedById", "reference", "Created By ID", nillable=False, reference_to=["User"],
          relationship="CreatedBy", createable=False, updateable=False),
        F("CreatedDate", "datetime", "Created Date", nillable=False, createable=False, updateable=False),
        F("Field", "picklist", "Changed Field", nillable=False, createable=False, updateable=False,
          picklist=["created", "Email", "Phone", "Title"]),
        F("DataType", "picklist", "Data Type", createable=False, updateable=False,
          picklist=["Text", "EmailAddress", "Phone"]),
        F("OldValue", "anyType", "Old Value", createable=False, updateable=False),
        F("NewValue", "anyType", "New Value", createable=False, updateable=False),
    ]
    return SObjectType("ContactHistory", "Contact History", "017", fields, replicateable=False,
                       createable=False, label_plural="Contact History")


def aggregate_result_type():
    """Listed by describeGlobal but neither queryable nor replicateable."""
    fields = [F("Id", "id", "AggregateResult ID", nillable=False, createable=False, updateable=False)]
    return SObjectType("AggregateResult", "AggregateResult", None, fields, queryable=False,
                       replicateable=False, retrieveable=False, createable=False,
                       label_plural="AggregateResult")


CUSTOM_STATUSES = ["New", "In Progress", "On Hold", "Done", "Cancelled"]
CUSTOM_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)*__c$")


def custom_object_type(name, label, label_plural, key_prefix):
    """A custom sObject as Setup creates it: a text Name field plus a few custom fields."""
    audit = system_fields(name)
    fields = [
        F("Id", "id", "Record ID", nillable=False, createable=False, updateable=False, defaulted=True),
        audit[0],                                                   # OwnerId
        F("IsDeleted", "boolean", "Deleted", nillable=False, createable=False, updateable=False,
          defaulted=True, default_value=False),
        # A text Name is nillable in describe: a record created without one is named after its
        # (15-char) Id.
        F("Name", "string", label + " Name", length=80, name_field=True, defaulted=True),
    ] + audit[1:] + [
        F("Amount__c", "currency", "Amount", precision=18, scale=2),
        F("Quantity__c", "double", "Quantity", precision=18, scale=0),
        F("Status__c", "picklist", "Status", picklist=CUSTOM_STATUSES),
        F("Notes__c", "textarea", "Notes", length=255),
    ]
    return SObjectType(name, label, key_prefix, fields, custom=True, label_plural=label_plural)


# ----------------------------------------------------------------------------
# Seed data
# ----------------------------------------------------------------------------

FIRST_NAMES = ["James", "Mary", "José", "Zoë", "Łukasz", "Søren", "Aoife", "Nguyễn", "Ana María",
               "Björn", "François", "Chloé", "Renée", "Jürgen", "Siobhán", "Mohammed", "Priya",
               "Wei", "Yuki", "Olga", "Émile", "Ingrid", "Tomás", "Noël", "D'Arcy", "Anne-Marie",
               "John", "Linda", "Michael", "Sarah", "David", "Emma", "Daniel", "Laura", "花子"]
LAST_NAMES = ["Smith", "O'Brien", "Müller", "García", "Åkesson", "Kowalski", "Nakamura", "渡辺",
              "Đặng", "Ivanov", "D'Angelo", "Nuñez", "Østergaard", "MacDonald", "Smith-Jones",
              "Lee", "Papadopoulos", "Schröder", "Johnson", "Brown", "Wilson", "Taylor", "Martin",
              "Thompson", "White", "Harris", "Clark", "Lewis", "Robinson", "Walker", "Young"]
TITLES = ["CEO", "CTO", "VP, Sales", "Director of R&D", "Account Manager", "Engineer",
          "Buyer \"Senior\"", "Head of Ops; EMEA", "Consultant", "Analyst"]
DEPARTMENTS = ["Sales", "Finance", "Engineering", "Marketing", "Operations", "Legal"]
CITIES = [("San Francisco", "CA", "94105", "USA", 37.7897, -122.3972),
          ("New York", "NY", "10001", "USA", 40.7506, -73.9972),
          ("München", "Bayern", "80331", "Germany", 48.1374, 11.5755),
          ("Kraków", None, "30-001", "Poland", 50.0614, 19.9366),
          ("São Paulo", "SP", "01000-000", "Brazil", -23.5505, -46.6333),
          ("Montréal", "QC", "H2Y 1C6", "Canada", 45.5019, -73.5674),
          ("Tokyo", None, "100-0001", "Japan", 35.6812, 139.7671),
          ("Dublin", None, "D02 X285", "Ireland", 53.3498, -6.2603)]
STREETS = ["1 Market St", "350 Fifth Avenue\nSuite 3300", "Marienplatz 8", "ul. Floriańska 12",
           "Av. Paulista, 1000", "1000 Rue Saint-Antoine O", "1-1 Marunouchi", "12 O'Connell St"]
DESCRIPTIONS = ["Prefers email; no calls", "Said \"call me later\"", "It's complicated; see notes",
                "Line one\nLine two", "Tab\tseparated\tvalues", "Backslash \\ path C:\\temp\\x",
                "Emoji 🎉 party", "Comma, semicolon; colon: done", "<b>html</b> & ampersand",
                "Ünïcödé ✓ — dash", "50% off; 'quoted' value"]
COMPANY_WORDS = ["Acme", "Globex", "Initech", "Umbrella", "Stark", "Wayne", "Hooli", "Vandelay",
                 "Müller & Söhne", "O'Reilly", "Tyrell", "Soylent", "Cyberdyne", "Nakatomi"]
COMPANY_SUFFIX = ["Inc.", "GmbH", "Ltd", "LLC", "S.A.", "Corp.", "& Co", "Group"]


def timestamp_schedule(rng, count, end, first_batch, big_batch):
    """SystemModstamps for `count` records in creation order, all before `end`.

    Records come in bursts sharing ONE second (like a bulk update): the first
    `first_batch` records share a timestamp, and when `big_batch` is set a burst
    larger than a 2000-record page sits in the middle. Gaps between bursts are
    up to 15 minutes, so a few thousand records spread over days."""
    sizes = []
    remaining = count
    if first_batch and remaining >= first_batch:
        sizes.append(first_batch)
        remaining -= first_batch
    big_at = count // 2 if big_batch and count - first_batch >= big_batch + 100 else None
    placed = sum(sizes)
    while remaining > 0:
        if big_at is not None and placed >= big_at:
            size, big_at = big_batch, None
        else:
            size = rng.choice([1, 1, 1, 1, 1, 1, 2, 2, 3, 5, 12])
        size = min(size, remaining)
        sizes.append(size)
        remaining -= size
        placed += size
    gaps = [rng.randint(1, 900) for _ in sizes]
    t = end - timedelta(hours=1) - timedelta(seconds=sum(gaps))
    out = []
    for size, gap in zip(sizes, gaps):
        t += timedelta(seconds=gap)
        out.extend([t] * size)
    return out


def maybe(rng, p, value):
    """value with probability p, else None (seeded data has realistic nulls)."""
    return value if rng.random() < p else None


# ----------------------------------------------------------------------------
# The org: all mutable state, guarded by one lock
# ----------------------------------------------------------------------------

class Org:
    def __init__(self, cfg):
        self.cfg = cfg
        self.lock = threading.RLock()
        self.clock_offset = 0.0
        self.tokens = {}               # access_token -> issued datetime
        self.tokens_issued = 0
        self.token_rng = random.Random(secrets.randbits(64))
        self.faults = []
        self.fault_seq = 0
        self.request_log = []
        self.endpoint_counts = {}
        self.api_max = cfg.daily_limit
        self.api_used = 0
        self.base_url = None
        self.page_cap = None
        self.org_id = "00DHp0000001SfK" + id_suffix("00DHp0000001SfK")
        self.user_id = "005Hp00000AdMin" + id_suffix("005Hp00000AdMin")
        self.bulk_engine = BulkEngine(self)
        # records whose JSON (per record, and per page) the caches keep: see render_array, page
        self.render_limit = max(0, int(getattr(cfg, "render_cache", DEFAULT_RENDER_CACHE)))
        self.query_gzip_level = int(getattr(cfg, "query_gzip_level", 1))
        self.seed_data(cfg.records, cfg.accounts, cfg.seed, cfg.deleted)

    # -- clock ---------------------------------------------------------------

    def now(self):
        return datetime.now(UTC) + timedelta(seconds=self.clock_offset)

    def now_second(self):
        """Write timestamps are second-granular (.000), like SystemModstamp in practice."""
        return self.now().replace(microsecond=0)

    # -- Bulk API 2.0 state ----------------------------------------------------

    def reset_bulk(self, seed):
        """No jobs, default settings, a fresh DailyBulkV2QueryJobs allocation."""
        with self.lock:
            for job in getattr(self, "bulk_jobs", {}).values():
                job.state = "Deleted"                   # pending timers see it is gone
            self.bulk_jobs = {}                         # id -> BulkJob, in creation order
            self.bulk = dict(BULK_DEFAULTS)
            self.bulk_fail = []                         # messages for the next jobs to fail
            self.bulk_job_times = []                    # creation times (server clock), last 24 h
            self.bulk_jobs_max = BULK_DAILY_JOBS
            self.bulk_storage = []                      # (completion time, MB) of results, last 24 h
            self.bulk_storage_max = BULK_DAILY_STORAGE_MB
            # Own id stream: creating jobs does not shift the ids of records created later.
            self.bulk_ids = IdFactory(random.Random(seed * 7919 + 750))
            self.bulk_ids.used = self.ids.used

    def bulk_jobs_used(self):
        """Query jobs created in the last 24 h (rolling, by the server clock)."""
        cutoff = self.now() - timedelta(days=1)
        self.bulk_job_times = [t for t in self.bulk_job_times if t > cutoff]
        return len(self.bulk_job_times)

    def bulk_storage_used(self):
        cutoff = self.now() - timedelta(days=1)
        self.bulk_storage = [(t, mb) for t, mb in self.bulk_storage if t > cutoff]
        return sum(mb for _, mb in self.bulk_storage)

    def bulk_job(self, job_id):
        """A live job by id (15 or 18 chars), or None. Terminal jobs older than 7 days are gone."""
        if not ID_RE.match(job_id or ""):
            return None
        job = self.bulk_jobs.get(to_id18(job_id))
        if job is not None and job.terminal() and self.now() - job.created > BULK_JOB_LIFESPAN:
            del self.bulk_jobs[job.id]
            job.state = "Deleted"
            job.drop_results()
            return None
        return job

    # -- seeding -------------------------------------------------------------

    def seed_data(self, n_contacts, n_accounts, seed, n_deleted):
        # The cyclic GC would rescan every seeded record again and again while a million are
        # made (and later on every big allocation burst, e.g. serialising a Bulk job): seed with
        # it off, then freeze the seeded objects out of its sight. (Records hold no cycles:
        # reference counting frees them.)
        gc.disable()
        try:
            self.seed_data_locked(n_contacts, n_accounts, seed, n_deleted)
        finally:
            gc.enable()
            gc.freeze()

    def seed_data_locked(self, n_contacts, n_accounts, seed, n_deleted):
        with self.lock:
            self.seed = seed
            rng = random.Random(seed)
            self.ids = IdFactory(random.Random(seed * 7919 + 17))
            self.users = [self.user_id] + [self.ids.new("005") for _ in range(4)]
            self.types = {}
            for t in (account_type(), contact_type(self), contact_history_type(), aggregate_result_type()):
                self.types[t.name.lower()] = t
            self.render_cache = {}
            self.page_cache = {}          # (sig, first Id, count) -> Page (see page())
            self.page_cached = 0          # records in page_cache
            self.query_cache = {}         # (SOQL, include_deleted) -> QueryResult (see query_result())
            # Bumped by every write; never goes back (a reset keeps counting), so a cache entry
            # stamped with a generation can never be taken for a later state.
            self.write_gen = getattr(self, "write_gen", 0) + 1
            self.delete_log = []          # [{object, id, at}] in time order
            self.earliest_deleted = None  # admin-set purge point
            self.purge_mode = "error"
            self.locators = {}
            self.custom_seq = 0           # key prefixes a01, a02, ... are never reused
            self.reset_bulk(seed)
            self.base_time = self.cfg.base_time or self.now().replace(minute=0, second=0, microsecond=0)
            self.seed_accounts(rng, n_accounts)
            self.seed_contacts(rng, n_contacts + n_deleted)
            self.seed_history(rng)
            self.seed_deletions(rng, n_deleted)

    def seed_accounts(self, rng, count):
        obj = self.types["account"]
        stamps = timestamp_schedule(rng, count, self.base_time - timedelta(days=1), min(50, count // 2), 0)
        for i in range(count):
            k = rng.randrange(len(CITIES))
            city, state, postal, country, lat, lon = CITIES[k]
            name = "%s %s %d" % (rng.choice(COMPANY_WORDS), rng.choice(COMPANY_SUFFIX), i + 1)
            rec = {
                "Id": self.ids.new("001"), "IsDeleted": False, "Name": name,
                "Type": maybe(rng, 0.8, rng.choice(obj.field("Type").picklist)),
                "Industry": maybe(rng, 0.7, rng.choice(obj.field("Industry").picklist)),
                "BillingStreet": maybe(rng, 0.9, STREETS[k]), "BillingCity": city,
                "BillingState": state, "BillingPostalCode": postal, "BillingCountry": country,
                "BillingLatitude": maybe(rng, 0.6, lat), "BillingLongitude": None,
                "BillingGeocodeAccuracy": None,
                "Phone": maybe(rng, 0.8, "+1 (415) 555-%04d" % rng.randint(0, 9999)),
                "Website": maybe(rng, 0.7, "https://www.example-%d.com/" % i),
                "AnnualRevenue": maybe(rng, 0.6, float(rng.randint(1, 5000) * 10000)),
                "NumberOfEmployees": maybe(rng, 0.7, rng.randint(1, 250000)),
                "Description": maybe(rng, 0.4, rng.choice(DESCRIPTIONS)),
            }
            if rec["BillingLatitude"] is not None:
                rec["BillingLongitude"], rec["BillingGeocodeAccuracy"] = lon, "Zip"
            self.stamp_seeded(rng, rec, stamps[i])
            obj.records[rec["Id"]] = rec

    def seed_contacts(self, rng, count):
        """Contacts in creation order. This loop seeds 1,000,000 records for benchmarks, so it
        is written for speed: FastDraw and local names instead of rng methods. Every draw is
        made in the same order as in the plain version (a dict literal evaluated left to right,
        with maybe(rng, p, value) drawing `value` first, then rng.random()): same seed, same data."""
        obj = self.types["contact"]
        accounts = list(self.types["account"].records)
        stamps = timestamp_schedule(rng, count, self.base_time, min(300, count),
                                    2100 if count >= 4500 else 0)
        draw = FastDraw(rng)
        choice, randint, randrange = draw.choice, draw.randint, draw.randrange
        rnd, uniform, sample = rng.random, rng.uniform, rng.sample
        new_id, records = self.ids.new, obj.records
        salutations = obj.field("Salutation").picklist
        users = self.users
        n_cities = len(CITIES)
        email_part = {}                  # name -> its letters for the e-mail address (re.sub is slow)
        quarter_hours = [0, 15, 30, 45]
        day0 = date(1950, 1, 1)
        interest_rank = INTERESTS.index
        for i in range(count):
            first = choice(FIRST_NAMES)
            first = first if rnd() < 0.95 else None
            last = choice(LAST_NAMES)
            k = randrange(n_cities)
            city, state, postal, country, lat, lon = CITIES[k]
            has_addr = rnd() < 0.85
            geo = has_addr and rnd() < 0.5
            bday = day0 + timedelta(days=randint(0, 365 * 55))
            a = first or "x"
            fpart = email_part.get(a)
            if fpart is None:
                fpart = email_part[a] = re.sub(r"[^a-z]", "", a.lower()) or "x"
            lpart = email_part.get(last + "\0")
            if lpart is None:
                lpart = email_part[last + "\0"] = re.sub(r"[^a-z]", "", last.lower()) or "y"
            email_name = "%s.%s%d" % (fpart, lpart, i)
            rec_id = new_id("003")
            if accounts:
                account = choice(accounts)
                account = account if rnd() < 0.9 else None
            else:
                account = None
            salutation = choice(salutations)
            salutation = salutation if rnd() < 0.5 else None
            lat_v = round(lat + uniform(-0.05, 0.05), 6) if geo else None
            lon_v = round(lon + uniform(-0.05, 0.05), 6) if geo else None
            phone = "+1 (%03d) 555-%04d" % (randint(200, 999), randint(0, 9999))
            phone = phone if rnd() < 0.8 else None
            mobile = "+44 7700 %06d" % randint(0, 999999)
            mobile = mobile if rnd() < 0.5 else None
            email = email_name + "@example.com" if rnd() < 0.9 else None
            title = choice(TITLES)
            title = title if rnd() < 0.7 else None
            dept = choice(DEPARTMENTS)
            dept = dept if rnd() < 0.5 else None
            source = choice(LEAD_SOURCES)
            source = source if rnd() < 0.6 else None
            birthdate = bday.isoformat() if rnd() < 0.6 else None
            desc = choice(DESCRIPTIONS)
            desc = desc if rnd() < 0.35 else None
            opted_out = rnd() < 0.1
            no_call = rnd() < 0.05
            tier = choice(TIERS)
            tier = tier if rnd() < 0.7 else None
            ltv = round(uniform(0, 250000), 2)
            ltv = ltv if rnd() < 0.8 else None
            score = round(uniform(0, 100), 1)
            score = score if rnd() < 0.6 else None
            discount = round(uniform(0, 40), 2)
            discount = discount if rnd() < 0.5 else None
            visits = randint(0, 5000)
            visits = visits if rnd() < 0.8 else None
            interests = ";".join(sorted(sample(INTERESTS, randint(1, 3)), key=interest_rank))
            interests = interests if rnd() < 0.6 else None
            website = "https://example.org/people/%d?ref=a&b=c" % i if rnd() < 0.3 else None
            hour = randint(7, 19)
            contact_time = "%02d:%02d:00.000Z" % (hour, choice(quarter_hours))
            contact_time = contact_time if rnd() < 0.4 else None
            region = "R%d" % randint(1, 9)
            region = region if rnd() < 0.3 else None
            rec = {
                "Id": rec_id, "IsDeleted": False, "MasterRecordId": None,
                "AccountId": account,
                "LastName": last, "FirstName": first,
                "Salutation": salutation,
                "MailingStreet": STREETS[k] if has_addr else None,
                "MailingCity": city if has_addr else None,
                "MailingState": state if has_addr else None,
                "MailingPostalCode": postal if has_addr else None,
                "MailingCountry": country if has_addr else None,
                "MailingLatitude": lat_v,
                "MailingLongitude": lon_v,
                "MailingGeocodeAccuracy": "Address" if geo else None,
                "Phone": phone,
                "MobilePhone": mobile,
                "Email": email,
                "Title": title,
                "Department": dept,
                "LeadSource": source,
                "Birthdate": birthdate,
                "Description": desc,
                "HasOptedOutOfEmail": opted_out,
                "DoNotCall": no_call,
                "LastActivityDate": None, "EmailBouncedDate": None,
                "Loyalty_Tier__c": tier,
                "Lifetime_Value__c": ltv,
                "Engagement_Score__c": score,
                "Discount_Rate__c": discount,
                "Visit_Count__c": visits,
                "Interests__c": interests,
                "Website__c": website,
                "Preferred_Contact_Time__c": contact_time,
                "External_Key__c": "EXT-%06d" % (i + 1),
                "Legacy_Region__c": region,
            }
            if rnd() < 0.03:
                rec["Lifetime_Value__c"] = 0.0
            rec["Name"] = first + " " + last if first else last
            # stamp_seeded(), inlined
            modstamp = stamps[i]
            created = modstamp - timedelta(seconds=randint(0, 400 * 86400))
            modified = modstamp if rnd() < 0.85 else max(
                created, modstamp - timedelta(seconds=randint(1, 30 * 86400)))
            rec["OwnerId"] = choice(users)
            rec["CreatedById"] = choice(users)
            rec["LastModifiedById"] = choice(users)
            rec["CreatedDate"] = fmt_dt(created)
            rec["LastModifiedDate"] = fmt_dt(modified)
            rec["SystemModstamp"] = stamp = fmt_dt(modstamp)
            if rnd() < 0.3:
                rec["LastActivityDate"] = stamp[:10]
            if rnd() < 0.02:
                rec["EmailBouncedDate"] = stamp
            records[rec_id] = rec

    def stamp_seeded(self, rng, rec, modstamp):
        draw = FastDraw(rng)
        created = modstamp - timedelta(seconds=draw.randint(0, 400 * 86400))
        modified = modstamp if rng.random() < 0.85 else max(
            created, modstamp - timedelta(seconds=draw.randint(1, 30 * 86400)))
        rec["OwnerId"] = draw.choice(self.users)
        rec["CreatedById"] = draw.choice(self.users)
        rec["LastModifiedById"] = draw.choice(self.users)
        rec["CreatedDate"] = fmt_dt(created)
        rec["LastModifiedDate"] = fmt_dt(modified)
        rec["SystemModstamp"] = fmt_dt(modstamp)

    def seed_history(self, rng):
        hist = self.types["contacthistory"]
        for cid, c in list(self.types["contact"].records.items())[:50]:
            for fname in ("created", "Email"):
                old = new = None
                if fname == "Email":
                    old, new = "old%d@example.com" % rng.randint(0, 999), c.get("Email")
                rid = self.ids.new("017")
                hist.records[rid] = {
                    "Id": rid, "IsDeleted": False, "ContactId": cid, "CreatedById": c["CreatedById"],
                    "CreatedDate": c["CreatedDate"], "Field": fname,
                    "DataType": "EmailAddress" if fname == "Email" else "Text",
                    "OldValue": old, "NewValue": new,
                }

    def seed_deletions(self, rng, count):
        """The last `count` seeded contacts start in the recycle bin (deleted at their SystemModstamp)."""
        obj = self.types["contact"]
        for cid in list(obj.records)[len(obj.records) - count:] if count else []:
            rec = dict(obj.records[cid], IsDeleted=True)
            obj.records[cid] = rec
            self.delete_log.append({"object": obj.name, "id": cid,
                                    "at": parse_iso(rec["SystemModstamp"].replace("+0000", "Z"))})
        self.delete_log.sort(key=lambda e: e["at"])

    def seed_custom(self, obj, count):
        """`count` records of a custom object, deterministic per (--seed, object name):
        the same calls on a fresh fake give the same ids and values."""
        rng = random.Random("%d/%s" % (self.seed, obj.name.lower()))
        ids = IdFactory(random.Random("%d/%s/ids" % (self.seed, obj.name.lower())))
        ids.used = self.ids.used          # one id space for the whole org
        stamps = timestamp_schedule(rng, count, self.base_time, min(50, count // 2), 0)
        for i in range(count):
            name = "%s %s #%d" % (rng.choice(COMPANY_WORDS), obj.label, i + 1)
            rec = {
                "Id": ids.new(obj.key_prefix), "IsDeleted": False, "Name": name[:80],
                "Amount__c": maybe(rng, 0.8, round(rng.uniform(0, 100000), 2)),
                "Quantity__c": maybe(rng, 0.7, float(rng.randint(0, 1000))),
                "Status__c": maybe(rng, 0.9, rng.choice(CUSTOM_STATUSES)),
                "Notes__c": maybe(rng, 0.4, rng.choice(DESCRIPTIONS)),
            }
            if rng.random() < 0.03:
                rec["Amount__c"] = 0.0
            self.stamp_seeded(rng, rec, stamps[i])
            obj.records[rec["Id"]] = rec

    # -- serialisation -------------------------------------------------------------

    def render_array(self, obj, recs, fields, version):
        """JSON array of records as the REST API returns them, as UTF-8 bytes.

        Each record's JSON is cached per (field list, API version). Records are
        replaced (never mutated) on write, so an identity check on the record dict
        detects staleness; formula fields read other records, so their cache
        entries also carry the org-wide write generation."""
        sig = (obj.name, version, tuple(f.name for f in fields))
        gen = self.write_gen if any(f.calculated for f in fields) else 0
        cache = self.render_cache
        if len(cache) > self.render_limit:
            cache.clear()
        parts, missing = [], []
        for rec in recs:
            hit = cache.get((rec["Id"], sig))
            if hit is not None and hit[0] is rec and hit[1] == gen:
                parts.append(hit[2])
            else:
                parts.append(None)
                missing.append(len(parts) - 1)
        if missing:
            fresh = render_records(obj, [recs[i] for i in missing], fields, version)
            for i, d in zip(missing, fresh):
                data = RECORD_ENCODER.encode(d).encode()
                cache[(recs[i]["Id"], sig)] = (recs[i], gen, data)
                parts[i] = data
        return b"[" + b",".join(parts) + b"]"

    def page(self, obj, recs, fields, version):
        """The records array of one query page, as a Page (raw bytes, deflate piece made on
        demand). Cached per (sig, first Id, count) and valid only for the very same record
        dicts in the same order (records are replaced, never mutated, on write) and, with a
        formula field, the same write generation: render_array's rule, for a whole page."""
        sig = (obj.name, version, tuple(f.name for f in fields))
        gen = self.write_gen if any(f.calculated for f in fields) else 0
        key = (sig, recs[0]["Id"] if recs else "", len(recs))
        page = self.page_cache.get(key)
        if page is not None and page.gen == gen and all(map(is_, page.recs, recs)):
            return page
        page = Page(recs, gen, self.render_array(obj, recs, fields, version))
        if not self.render_limit or len(recs) > self.render_limit:
            return page                         # --render-cache 0: no cache at all
        with self.lock:
            old = self.page_cache.pop(key, None)
            if old is not None:
                self.page_cached -= len(old.recs)
            self.page_cache[key] = page
            self.page_cached += len(recs)
            while self.page_cached > self.render_limit:       # drop the oldest pages
                self.page_cached -= len(self.page_cache.pop(next(iter(self.page_cache))).recs)
        return page

    def query_result(self, cq, soql, include_deleted):
        """run_query's answer as (records, ids), the last QUERY_CACHE_SIZE answers cached per
        SOQL text until the next write (caller holds the lock): a repeated query does not sort
        all records again. The lists are shared (locators keep them): nobody changes them."""
        key = (soql, include_deleted)
        hit = self.query_cache.get(key)
        if hit is not None and hit.gen == self.write_gen and hit.obj is cq.obj:
            return hit.recs, hit.ids
        recs = run_query(self, cq, include_deleted)
        ids = [r["Id"] for r in recs]
        self.query_cache.pop(key, None)
        if self.render_limit:                   # --render-cache 0: no cache at all
            self.query_cache[key] = QueryResult(self.write_gen, cq.obj, recs, ids)
            while len(self.query_cache) > QUERY_CACHE_SIZE:
                del self.query_cache[next(iter(self.query_cache))]
        return recs, ids

    # -- lookups ---------------------------------------------------------------

    def sobject(self, name):
        return self.types.get((name or "").lower())

    def account_name(self, account_id):
        acc = self.types["account"].records.get(account_id) if account_id else None
        return acc["Name"] if acc and not acc["IsDeleted"] else None

    # -- tokens ----------------------------------------------------------------

    def issue_token(self):
        with self.lock:
            alphabet = BASE62 + "._"
            token = self.org_id[:15] + "!" + "".join(self.token_rng.choice(alphabet) for _ in range(96))
            self.tokens[token] = self.now()
            self.tokens_issued += 1
            return token

    def token_valid(self, token):
        with self.lock:
            issued = self.tokens.get(token)
            if issued is None:
                return False
            if (self.now() - issued).total_seconds() >= self.cfg.token_lifetime:
                del self.tokens[token]
                return False
            return True

    # -- writes (admin) -----------------------------------------------------------

    def coerce(self, obj, values, creating):
        """Validate admin-supplied field values and convert them to wire form."""
        out = {}
        overridable = {"systemmodstamp", "createddate", "lastmodifieddate", "ownerid", "lastactivitydate"}
        for key, value in values.items():
            f = obj.by_lower.get(key.lower())
            if f is None:
                raise AdminError(400, "No such column '%s' on entity '%s'" % (key, obj.name))
            # Test hooks may backdate audit fields (e.g. a "late commit"); everything else
            # follows describe's createable/updateable.
            if not (f.createable if creating else f.updateable) and f.name.lower() not in overridable:
                raise AdminError(400, "field %s is not writeable" % f.name)
            out[f.name] = self.coerce_value(f, value)
        return out

    @staticmethod
    def coerce_value(f, value):
        if value is None:
            if not f.nillable and f.type != "boolean":
                raise AdminError(400, "field %s is required" % f.name)
            return None
        t = f.type
        if t == "boolean":
            if not isinstance(value, bool):
                raise AdminError(400, "field %s wants a JSON boolean" % f.name)
            return value
        if t == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise AdminError(400, "field %s wants an integer" % f.name)
            return value
        if t in NUMBER_TYPES:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise AdminError(400, "field %s wants a number" % f.name)
            return round(float(value), f.scale) if f.scale else float(value)
        if t == "datetime":
            return fmt_dt(parse_any_dt(value))
        if t == "date":
            try:
                return date.fromisoformat(value).isoformat()
            except (TypeError, ValueError):
                raise AdminError(400, "field %s wants YYYY-MM-DD" % f.name)
        if t == "time":
            if not isinstance(value, str) or not re.match(r"^\d{2}:\d{2}:\d{2}(\.\d{3})?Z$", value):
                raise AdminError(400, "field %s wants HH:MM:SS.000Z" % f.name)
            return value if "." in value else value[:-1] + ".000Z"
        if t == "multipicklist" and isinstance(value, list):
            value = ";".join(value)
        if not isinstance(value, str):
            raise AdminError(400, "field %s wants a string" % f.name)
        if t in ("id", "reference") and not ID_RE.match(value):
            raise AdminError(400, "field %s wants a Salesforce id" % f.name)
        if f.length and len(value) > f.length:
            raise AdminError(400, "field %s longer than %d" % (f.name, f.length))
        return to_id18(value) if t in ("id", "reference") else value

    def writable_type(self, name):
        obj = self.sobject(name)
        if obj is None:
            raise AdminError(404, "unknown sObject %s" % name)
        if not obj.createable:
            raise AdminError(400, "%s is read-only" % obj.name)
        return obj

    def create(self, obj_name, values):
        with self.lock:
            self.write_gen += 1
            obj = self.writable_type(obj_name)
            fields = self.coerce(obj, values, creating=True)
            stamp = fmt_dt(self.now_second())
            rec = {}
            for f in obj.fields:
                if f.type != "address" and not f.calculated:
                    rec[f.name] = (f.default_value or False) if f.type == "boolean" else None
            rec.update({"Id": self.ids.new(obj.key_prefix), "IsDeleted": False,
                        "OwnerId": self.user_id, "CreatedById": self.user_id,
                        "LastModifiedById": self.user_id, "CreatedDate": stamp,
                        "LastModifiedDate": stamp, "SystemModstamp": stamp})
            rec.update(fields)
            for f in obj.fields:
                if not f.nillable and rec.get(f.name) is None and not (obj.name == "Contact" and f.name == "Name"):
                    raise AdminError(400, "Required fields are missing: [%s]" % f.name)
            if obj.name == "Contact":
                rec["Name"] = contact_name(rec)
            elif obj.custom and rec.get("Name") is None:
                rec["Name"] = rec["Id"][:15]       # Salesforce names an unnamed record by its id
            obj.records[rec["Id"]] = rec
            return rec

    def live_record(self, obj, rec_id):
        rec = obj.records.get(to_id18(rec_id))
        if rec is None or rec["IsDeleted"]:
            raise AdminError(404, "no live %s with id %s" % (obj.name, rec_id))
        return rec

    def update(self, obj_name, rec_id, values, bump=True, stamp=None):
        with self.lock:
            self.write_gen += 1
            obj = self.writable_type(obj_name)
            rec = dict(self.live_record(obj, rec_id))
            rec.update(self.coerce(obj, values, creating=False))
            if bump:
                stamp = stamp or fmt_dt(self.now_second())
                if not any(k.lower() == "systemmodstamp" for k in values):
                    rec["SystemModstamp"] = stamp
                if not any(k.lower() == "lastmodifieddate" for k in values):
                    rec["LastModifiedDate"] = stamp
                rec["LastModifiedById"] = self.user_id
            if obj.name == "Contact":
                rec["Name"] = contact_name(rec)
            elif obj.custom and rec.get("Name") is None:
                rec["Name"] = rec["Id"][:15]       # Salesforce names an unnamed record by its id
            obj.records[rec["Id"]] = rec
            return rec

    def bulk_update(self, obj_name, ids, count, values):
        """One 'transaction': every touched record gets the SAME SystemModstamp."""
        with self.lock:
            obj = self.writable_type(obj_name)
            if ids is None:
                ids = [i for i, r in obj.records.items() if not r["IsDeleted"]][:count]
            for rec_id in ids:
                self.live_record(obj, rec_id)
            stamp = fmt_dt(self.now_second())
            done = [self.update(obj.name, rec_id, values, stamp=stamp)["Id"] for rec_id in ids]
            return {"ids": done, "SystemModstamp": stamp}

    def delete(self, obj_name, rec_id, hard):
        with self.lock:
            self.write_gen += 1
            obj = self.writable_type(obj_name)
            rec = obj.records.get(to_id18(rec_id))
            if rec is None or (rec["IsDeleted"] and not hard):
                raise AdminError(404, "no %s record %s to delete" % (obj.name, rec_id))
            now = self.now_second()
            if not rec["IsDeleted"]:
                self.delete_log.append({"object": obj.name, "id": rec["Id"], "at": now})
            if hard:
                del obj.records[rec["Id"]]
            else:
                obj.records[rec["Id"]] = dict(rec, IsDeleted=True, SystemModstamp=fmt_dt(now),
                                              LastModifiedDate=fmt_dt(now))
            return {"id": rec["Id"], "hard": bool(hard), "deletedDate": fmt_dt(now)}

    def undelete(self, obj_name, rec_id):
        with self.lock:
            self.write_gen += 1
            obj = self.writable_type(obj_name)
            rec = obj.records.get(to_id18(rec_id))
            if rec is None or not rec["IsDeleted"]:
                raise AdminError(404, "no %s record %s in the recycle bin" % (obj.name, rec_id))
            stamp = fmt_dt(self.now_second())
            rec = dict(rec, IsDeleted=False, SystemModstamp=stamp, LastModifiedDate=stamp)
            obj.records[rec["Id"]] = rec
            # An undeleted record is no longer "deleted": drop it from the delete log.
            self.delete_log = [e for e in self.delete_log if e["id"] != rec["Id"]]
            return rec

    def empty_recycle_bin(self):
        with self.lock:
            self.write_gen += 1
            purged = 0
            for obj in self.types.values():
                for rec_id in [i for i, r in obj.records.items() if r["IsDeleted"]]:
                    del obj.records[rec_id]
                    purged += 1
            return purged

    def add_field(self, obj_name, spec):
        with self.lock:
            self.write_gen += 1
            obj = self.writable_type(obj_name)
            name = spec.get("name") or ""
            ftype = spec.get("type")
            if not re.match(r"^[A-Za-z][A-Za-z0-9_]*__c$", name) or obj.by_lower.get(name.lower()):
                raise AdminError(400, "field name must be new and end in __c")
            if ftype not in TEXT_TYPES | NUMBER_TYPES | {"boolean", "date", "datetime", "time", "reference"}:
                raise AdminError(400, "unsupported field type %r" % ftype)
            f = Field(name, ftype, spec.get("label"), length=spec.get("length"),
                      precision=spec.get("precision", 18 if ftype in NUMBER_TYPES else 0),
                      scale=spec.get("scale", 0), picklist=spec.get("picklistValues"),
                      reference_to=spec.get("referenceTo"), nillable=True,
                      default_value=False if ftype == "boolean" else None,
                      defaulted=ftype == "boolean", calculated=bool(spec.get("formula")),
                      formula=spec.get("formula"))
            obj.fields.append(f)
            obj.reindex()
            obj.schema_changed = self.now_second()
            # Adding a field does not touch SystemModstamp of existing rows.
            for rec_id, rec in list(obj.records.items()):
                obj.records[rec_id] = dict(rec, **{name: False if ftype == "boolean" else None})
            return f.describe()

    def remove_field(self, obj_name, field_name):
        with self.lock:
            self.write_gen += 1
            obj = self.writable_type(obj_name)
            f = obj.by_lower.get(field_name.lower())
            if f is None or not f.custom:
                raise AdminError(404, "no custom field %s on %s" % (field_name, obj.name))
            obj.fields.remove(f)
            obj.reindex()
            obj.schema_changed = self.now_second()
            return {"removed": f.name}

    # -- custom objects (admin) ------------------------------------------------------

    @staticmethod
    def custom_summary(obj):
        return {"name": obj.name, "label": obj.label, "labelPlural": obj.label_plural,
                "keyPrefix": obj.key_prefix, "records": sum(1 for r in list(obj.records.values())
                                                            if not r["IsDeleted"]),
                "fields": [f.name for f in obj.fields]}

    def add_custom_object(self, spec):
        if not isinstance(spec, dict):
            raise AdminError(400, "body must be a JSON object")
        name, count = spec.get("name"), spec.get("records", 0)
        if not isinstance(name, str) or not CUSTOM_NAME_RE.match(name) or len(name) > 43:
            raise AdminError(400, "object name must be a custom API name ending in __c "
                                  "(letter first, single underscores, at most 40 chars before __c): %r"
                             % (name,))
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= 1000000:
            raise AdminError(400, "records must be an integer 0..1000000")
        label = spec.get("label") or name[:-3].replace("_", " ")
        plural = spec.get("labelPlural") or label + "s"
        if not isinstance(label, str) or not isinstance(plural, str) or len(label) > 40:
            raise AdminError(400, "label and labelPlural must be strings (label at most 40 chars)")
        with self.lock:
            if name.lower() in self.types:
                raise AdminError(400, "sObject %s already exists" % self.types[name.lower()].name)
            taken = {t.key_prefix for t in self.types.values()}
            while True:
                self.custom_seq += 1
                if self.custom_seq >= 62 * 62:
                    raise AdminError(400, "out of custom key prefixes")
                prefix = "a" + BASE62[self.custom_seq // 62] + BASE62[self.custom_seq % 62]
                if prefix not in taken:
                    break
            obj = custom_object_type(name, label, plural, prefix)
            obj.schema_changed = self.now_second()
            self.seed_custom(obj, count)
            self.write_gen += 1
            # Copy-on-write: describeGlobal and recordCount iterate self.types without the lock.
            self.types = dict(self.types, **{name.lower(): obj})
            return self.custom_summary(obj)

    def drop_custom_object(self, name):
        with self.lock:
            obj = self.sobject(name)
            if obj is None:
                raise AdminError(404, "unknown sObject %s" % name)
            if not obj.custom:
                raise AdminError(400, "%s is a standard object; only custom objects can be deleted" % obj.name)
            self.types = {k: t for k, t in self.types.items() if t is not obj}
            self.write_gen += 1
            # Nothing of it survives: a new object of the same name starts clean.
            self.delete_log = [e for e in self.delete_log if e["object"] != obj.name]
            self.locators = {k: loc for k, loc in self.locators.items() if loc["obj"] is not obj}
            self.render_cache = {k: v for k, v in self.render_cache.items() if k[1][0] != obj.name}
            self.page_cache = {k: v for k, v in self.page_cache.items() if k[0][0] != obj.name}
            self.page_cached = sum(len(p.recs) for p in self.page_cache.values())
            self.query_cache = {k: v for k, v in self.query_cache.items() if v.obj is not obj}
            return {"removed": obj.name, "records": len(obj.records)}

    def list_custom_objects(self):
        with self.lock:
            return [self.custom_summary(t) for t in sorted(self.types.values(), key=lambda t: t.name)
                    if t.custom]

    # -- API usage -------------------------------------------------------------

    def count_api_call(self):
        """True when the call fits in the daily allocation (and is counted)."""
        with self.lock:
            if self.api_used >= self.api_max:
                return False
            self.api_used += 1
            return True

    def limit_header(self):
        return "api-usage=%d/%d" % (self.api_used, self.api_max)

    # -- faults ----------------------------------------------------------------

    def take_fault(self, target):
        with self.lock:
            return fault_pick(self.faults, target)

    def log_request(self, entry, endpoint):
        with self.lock:
            self.request_log.append(entry)
            if len(self.request_log) > 100000:
                del self.request_log[:50000]
            self.endpoint_counts[endpoint] = self.endpoint_counts.get(endpoint, 0) + 1


RECORD_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
DEFAULT_RENDER_CACHE = 300000     # --render-cache: records whose JSON the caches keep
QUERY_CACHE_SIZE = 8              # ordered query answers kept (Org.query_result)


class Page:
    """One query page's records array: the record dicts it was made from (validity), the
    write generation (formula fields), its JSON bytes, and (once a gzip answer needed it) their
    raw-deflate piece: deflate_piece(raw), spliced into gzip answers by Handler.page_answer."""
    __slots__ = ("recs", "gen", "raw", "piece")

    def __init__(self, recs, gen, raw):
        self.recs, self.gen, self.raw, self.piece = recs, gen, raw, None


class QueryResult:
    __slots__ = ("gen", "obj", "recs", "ids")

    def __init__(self, gen, obj, recs, ids):
        self.gen, self.obj, self.recs, self.ids = gen, obj, recs, ids


def contact_name(rec):
    return " ".join(p for p in (rec.get("FirstName"), rec.get("LastName")) if p)


# ----------------------------------------------------------------------------
# SOQL: tokenizer, parser, compiler
# ----------------------------------------------------------------------------

TOKEN_RE = re.compile(r"""
   (?P<ws>\s+)
 | (?P<datetime>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,3})?(?:Z|[+-]\d{2}:?\d{2}))(?![\w:.+-])
 | (?P<date>\d{4}-\d{2}-\d{2})(?![\w:.+-])
 | (?P<time>\d{2}:\d{2}:\d{2}(?:\.\d{1,3})?Z)(?![\w:.])
 | (?P<number>[-+]?\d+(?:\.\d+)?)(?![\w.])
 | (?P<ident>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
 | (?P<string>'(?:[^'\\]|\\.)*')
 | (?P<op>!=|<>|<=|>=|=|<|>)
 | (?P<punct>[(),])
""", re.X | re.S)
STRING_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "b": "\b", "f": "\f", "'": "'", '"': '"',
                  "\\": "\\", "_": "\\_", "%": "\\%"}
CLAUSE_WORDS = {"SELECT", "FROM", "WHERE", "ORDER", "BY", "LIMIT", "OFFSET", "AND", "OR", "NOT",
                "IN", "LIKE", "INCLUDES", "EXCLUDES", "ASC", "DESC", "NULLS", "FIRST", "LAST",
                "GROUP", "HAVING", "WITH", "FOR", "USING", "TYPEOF"}


class Token:
    __slots__ = ("kind", "text", "value", "pos")

    def __init__(self, kind, text, value, pos):
        self.kind, self.text, self.value, self.pos = kind, text, value, pos

    def kw(self):
        return self.text.upper() if self.kind == "ident" else None


class SoqlError(ApiError):
    """400 with Salesforce's caret-annotated message pointing at the offending spot."""

    def __init__(self, soql, pos, code, message):
        row = soql.count("\n", 0, pos) + 1
        line_start = soql.rfind("\n", 0, pos) + 1
        line_end = soql.find("\n", pos)
        line = soql[line_start:line_end if line_end >= 0 else len(soql)]
        col = pos - line_start + 1
        super().__init__(400, code, "\n%s\n%s^\nERROR at Row:%d:Column:%d\n%s"
                         % (line, " " * (col - 1), row, col, message))


def tokenize(soql):
    tokens, pos = [], 0
    while pos < len(soql):
        m = TOKEN_RE.match(soql, pos)
        if not m:
            raise ApiError(400, "MALFORMED_QUERY",
                           "line 1:%d no viable alternative at character '%s'" % (pos, soql[pos]))
        kind = m.lastgroup
        text = m.group(kind)
        if kind != "ws":
            tokens.append(Token(kind, text, literal_value(soql, kind, text, pos), pos))
        pos = m.end()
    tokens.append(Token("eof", "<EOF>", None, len(soql)))
    return tokens


def literal_value(soql, kind, text, pos):
    if kind == "string":
        out, i, body = [], 0, text[1:-1]
        while i < len(body):
            ch = body[i]
            if ch == "\\":
                nxt = body[i + 1]
                if nxt not in STRING_ESCAPES:
                    raise SoqlError(soql, pos, "MALFORMED_QUERY", "Invalid string literal '%s'. "
                                    "Illegal character sequence '\\%s' in string literal." % (text, nxt))
                out.append(STRING_ESCAPES[nxt])
                i += 2
            else:
                out.append(ch)
                i += 1
        return "".join(out)
    if kind == "datetime":
        dt = parse_iso(text)
        if dt is None:
            raise SoqlError(soql, pos, "MALFORMED_QUERY", "line 1:%d no viable alternative at "
                            "character '%s'" % (pos, text[0]))
        return fmt_dt(dt)
    if kind == "date":
        try:
            return date.fromisoformat(text).isoformat()
        except ValueError:
            raise SoqlError(soql, pos, "MALFORMED_QUERY", "line 1:%d no viable alternative at "
                            "character '%s'" % (pos, text[0]))
    if kind == "time":
        return text if "." in text else text[:-1] + ".000Z"
    if kind == "number":
        return float(text) if "." in text else int(text)
    return None


class Parser:
    """Recursive descent over the SOQL subset sync needs. Produces a plain AST:

    select: ("count", None) | ("count", tok) | ("fields", [tok, ...])
    where:  ("and"|"or", [node...]) | ("not", node) | ("cmp", fieldtok, op, littok)
            | ("in", fieldtok, negated, [littok...]) | ("like", fieldtok, littok)
            | ("includes"|"excludes", fieldtok, [littok...])
    """

    def __init__(self, soql):
        self.soql = soql
        self.toks = tokenize(soql)
        self.i = 0

    def peek(self, ahead=0):
        return self.toks[min(self.i + ahead, len(self.toks) - 1)]

    def next(self):
        tok = self.peek()
        self.i += 1
        return tok

    def unexpected(self, tok=None):
        tok = tok or self.peek()
        return SoqlError(self.soql, tok.pos, "MALFORMED_QUERY", "unexpected token: '%s'" % tok.text
                         if tok.kind != "eof" else "unexpected token: <EOF>")

    def accept_kw(self, *words):
        if self.peek().kw() in words:
            return self.next()
        return None

    def expect_kw(self, word):
        tok = self.accept_kw(word)
        if tok is None:
            raise self.unexpected()
        return tok

    def expect_punct(self, ch):
        tok = self.peek()
        if tok.kind != "punct" or tok.text != ch:
            raise self.unexpected()
        return self.next()

    def field_token(self):
        tok = self.peek()
        if tok.kind != "ident" or tok.kw() in CLAUSE_WORDS:
            raise self.unexpected()
        return self.next()

    def parse(self):
        q = {"where": None, "order": [], "limit": None, "offset": None}
        self.expect_kw("SELECT")
        q["select"] = self.parse_select()
        self.expect_kw("FROM")
        q["from"] = self.field_token()
        if self.accept_kw("WHERE"):
            q["where"] = self.parse_condition()
        if self.accept_kw("ORDER"):
            self.expect_kw("BY")
            q["order"] = self.parse_order()
        if self.accept_kw("LIMIT"):
            q["limit"] = self.parse_count_number()
        if self.accept_kw("OFFSET"):
            q["offset"] = self.parse_count_number()
        if self.peek().kind != "eof":
            raise self.unexpected()
        return q

    def parse_select(self):
        if self.peek().kw() == "COUNT" and self.peek(1).text == "(":
            self.next()
            self.next()
            arg = None
            if not (self.peek().kind == "punct" and self.peek().text == ")"):
                arg = self.field_token()
            self.expect_punct(")")
            return ("count", arg)
        fields = [self.field_token()]
        while self.peek().text == ",":
            self.next()
            fields.append(self.field_token())
        return ("fields", fields)

    def parse_count_number(self):
        tok = self.next()
        if tok.kind != "number" or not isinstance(tok.value, int) or tok.value < 0:
            raise self.unexpected(tok)
        return tok.value

    def parse_order(self):
        items = []
        while True:
            tok = self.field_token()
            desc = self.accept_kw("DESC") is not None
            if not desc:
                self.accept_kw("ASC")
            nulls_first = not desc
            if self.accept_kw("NULLS"):
                which = self.accept_kw("FIRST", "LAST")
                if which is None:
                    raise self.unexpected()
                nulls_first = which.kw() == "FIRST"
            items.append((tok, desc, nulls_first))
            if self.peek().text != ",":
                return items
            self.next()

    def parse_condition(self):
        """SOQL has no AND/OR precedence: mixing them without parentheses is an error."""
        first = self.parse_simple()
        joiner = self.peek().kw()
        if joiner not in ("AND", "OR"):
            return first
        parts = [first]
        while self.peek().kw() in ("AND", "OR"):
            if self.peek().kw() != joiner:
                raise self.unexpected()
            self.next()
            parts.append(self.parse_simple())
        return (joiner.lower(), parts)

    def parse_simple(self):
        if self.accept_kw("NOT"):
            return ("not", self.parse_simple())
        if self.peek().kind == "punct" and self.peek().text == "(":
            self.next()
            node = self.parse_condition()
            self.expect_punct(")")
            return node
        field = self.field_token()
        tok = self.peek()
        if tok.kw() == "NOT" and self.peek(1).kw() == "IN":
            self.i += 2
            return ("in", field, True, self.parse_list())
        if tok.kw() == "IN":
            self.next()
            return ("in", field, False, self.parse_list())
        if tok.kw() == "LIKE":
            self.next()
            return ("like", field, self.parse_literal())
        if tok.kw() in ("INCLUDES", "EXCLUDES"):
            self.next()
            return (tok.kw().lower(), field, self.parse_list())
        if tok.kind != "op":
            raise self.unexpected()
        self.next()
        op = "!=" if tok.text == "<>" else tok.text
        return ("cmp", field, op, self.parse_literal())

    def parse_list(self):
        self.expect_punct("(")
        items = [self.parse_literal()]
        while self.peek().text == ",":
            self.next()
            items.append(self.parse_literal())
        self.expect_punct(")")
        return items

    def parse_literal(self):
        tok = self.next()
        if tok.kind in ("string", "number", "datetime", "date", "time"):
            return tok
        word = tok.kw()
        if word in ("TRUE", "FALSE", "NULL"):
            tok.kind = word.lower()
            tok.value = {"TRUE": True, "FALSE": False, "NULL": None}[word]
            return tok
        raise self.unexpected(tok)


# Which literal kind each field type accepts in WHERE, and the name SF's message uses.
LITERAL_FOR_TYPE = {
    "boolean": ({"true", "false"}, "boolean"), "int": ({"number"}, "int"),
    "double": ({"number"}, "double"), "currency": ({"number"}, "currency"),
    "percent": ({"number"}, "percent"), "date": ({"date"}, "date"),
    "datetime": ({"datetime"}, "dateTime"), "time": ({"time"}, "time"),
}


class CompiledQuery:
    def __init__(self, obj, fields, count, count_field, predicate, order, limit, offset):
        self.obj = obj
        self.fields = fields            # [Field] in SELECT order
        self.count = count              # COUNT() / COUNT(field)
        self.count_field = count_field
        self.predicate = predicate
        self.order = order
        self.limit = limit
        self.offset = offset


def compile_soql(org, soql):
    q = Parser(soql).parse()
    obj_tok = q["from"]
    obj = org.sobject(obj_tok.text)
    if obj is None or "." in obj_tok.text:
        raise SoqlError(soql, obj_tok.pos, "INVALID_TYPE",
                        "sObject type '%s' is not supported. If you are attempting to use a custom "
                        "object, be sure to append the '__c' after the entity name. Please reference "
                        "your WSDL or the describe call for the appropriate names." % obj_tok.text)
    if not obj.queryable:
        raise SoqlError(soql, obj_tok.pos, "INVALID_TYPE",
                        "entity type %s does not support query" % obj.name)

    def resolve(tok):
        if "." in tok.text:
            raise SoqlError(soql, tok.pos, "INVALID_FIELD",
                            "Didn't understand relationship '%s' in field path. If you are attempting "
                            "to use a custom relationship, be sure to append the '__r' after the custom "
                            "relationship name. Please reference your WSDL or the describe call for the "
                            "appropriate names." % tok.text.split(".")[0])
        f = obj.field(tok.text)
        if f is None:
            raise SoqlError(soql, tok.pos, "INVALID_FIELD",
                            "No such column '%s' on entity '%s'. If you are attempting to use a custom "
                            "field, be sure to append the '__c' after the custom field name. Please "
                            "reference your WSDL or the describe call for the appropriate names."
                            % (tok.text, obj.name))
        return f

    kind, payload = q["select"]
    fields, count_field = [], None
    if kind == "fields":
        seen = set()
        for tok in payload:
            f = resolve(tok)
            if f.name in seen:
                raise SoqlError(soql, tok.pos, "INVALID_FIELD", "duplicate field selected: %s" % f.name)
            seen.add(f.name)
            fields.append(f)
    elif payload is not None:
        count_field = resolve(payload)
    predicate = compile_where(soql, q["where"], resolve) if q["where"] else None
    order = []
    for tok, desc, nulls_first in q["order"]:
        f = resolve(tok)
        if not f.sortable:
            raise SoqlError(soql, tok.pos, "INVALID_FIELD",
                            "field '%s' can not be sorted in a query call" % f.name)
        order.append((f, desc, nulls_first))
    if kind == "count" and order:
        raise SoqlError(soql, q["order"][0][0].pos, "MALFORMED_QUERY",
                        "Ordered field cannot be aggregated in a query that is not grouped: %s"
                        % q["order"][0][0].text)
    if q["offset"] is not None and q["offset"] > 2000:
        raise ApiError(400, "NUMBER_OUTSIDE_VALID_RANGE", "Maximum SOQL offset allowed is 2000")
    return CompiledQuery(obj, fields, kind == "count", count_field, predicate, order,
                         q["limit"], q["offset"])


def sort_key_fn(f):
    """Text compares case-insensitively in SOQL; ids compare as plain (case-sensitive) strings."""
    if f.type in TEXT_TYPES or f.type == "anyType":
        return lambda v: v.casefold()
    return lambda v: v


def compile_where(soql, node, resolve):
    kind = node[0]
    if kind in ("and", "or"):
        parts = [compile_where(soql, n, resolve) for n in node[1]]
        return (lambda r: all(p(r) for p in parts)) if kind == "and" else (lambda r: any(p(r) for p in parts))
    if kind == "not":
        inner = compile_where(soql, node[1], resolve)
        return lambda r: not inner(r)
    field_tok = node[1]
    f = resolve(field_tok)
    if not f.filterable:
        raise SoqlError(soql, field_tok.pos, "INVALID_FIELD",
                        "field '%s' can not be filtered in a query call" % f.name)
    get, norm = f.getter, sort_key_fn(f)
    if kind == "cmp":
        op, lit = node[2], node[3]
        value = check_literal(soql, f, lit)
        if value is None:
            if op not in ("=", "!="):
                return lambda r: False
            return (lambda r: get(r) is None) if op == "=" else (lambda r: get(r) is not None)
        if f.type == "multipicklist" and op in ("=", "!="):
            want = frozenset(v.casefold() for v in value.split(";"))
            test = lambda v: frozenset(x.casefold() for x in v.split(";")) == want
            return (lambda r: get(r) is not None and test(get(r))) if op == "=" else \
                (lambda r: get(r) is None or not test(get(r)))
        key = norm(value)
        cmp = {"=": lambda a: a == key, "!=": lambda a: a != key, "<": lambda a: a < key,
               "<=": lambda a: a <= key, ">": lambda a: a > key, ">=": lambda a: a >= key}[op]
        if op == "!=":
            return lambda r: get(r) is None or cmp(norm(get(r)))
        return lambda r: (lambda v: v is not None and cmp(norm(v)))(get(r))
    if kind == "in":
        negated = node[2]
        values = [check_literal(soql, f, lit) for lit in node[3]]
        keys = {norm(v) for v in values if v is not None}
        has_null = any(v is None for v in values)
        if negated:
            return lambda r: (lambda v: (v is not None or not has_null) and (v is None or norm(v) not in keys))(get(r))
        return lambda r: (lambda v: has_null if v is None else norm(v) in keys)(get(r))
    if kind == "like":
        if f.type not in TEXT_TYPES and f.type not in ("id", "reference"):
            raise SoqlError(soql, field_tok.pos, "INVALID_FIELD",
                            "invalid operator on %s field" % f.type)
        pattern = check_literal(soql, f, node[2])
        rx = like_regex(pattern)
        return lambda r: (lambda v: v is not None and rx.match(v) is not None)(get(r))
    # includes / excludes: multipicklist only; each literal is 'a' or 'a;b' (all of)
    if f.type != "multipicklist":
        raise SoqlError(soql, field_tok.pos, "INVALID_FIELD",
                        "includes or excludes operator only valid on multipicklist field")
    groups = [frozenset(x.casefold() for x in check_literal(soql, f, lit).split(";")) for lit in node[2]]
    has_any = lambda v: v is not None and any(g <= {x.casefold() for x in v.split(";")} for g in groups)
    return (lambda r: has_any(get(r))) if kind == "includes" else (lambda r: not has_any(get(r)))


def like_regex(pattern):
    out = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        out.append(".*" if ch == "%" else "." if ch == "_" else re.escape(ch))
        i += 1
    return re.compile("^" + "".join(out) + "$", re.S | re.I)


def check_literal(soql, f, lit):
    """Type-check a WHERE literal against the field as SOQL does; returns the comparable value."""
    if lit.kind == "null":
        return None
    if f.type in LITERAL_FOR_TYPE:
        kinds, type_name = LITERAL_FOR_TYPE[f.type]
        if lit.kind not in kinds:
            quoted = lit.kind == "string"
            raise SoqlError(soql, lit.pos, "INVALID_FIELD",
                            "value of filter criterion for field '%s' must be of type %s and should "
                            "not be enclosed in quotes" % (f.name, type_name) if quoted else
                            "value of filter criterion for field '%s' must be of type %s"
                            % (f.name, type_name))
        if f.type in ("double", "currency", "percent"):
            return float(lit.value)
        return lit.value
    if lit.kind != "string":
        raise SoqlError(soql, lit.pos, "INVALID_FIELD",
                        "value of filter criterion for field '%s' must be of type %s and should be "
                        "enclosed in quotes" % (f.name, "id" if f.type in ("id", "reference") else "string"))
    if f.type in ("id", "reference"):
        if not ID_RE.match(lit.value):
            raise SoqlError(soql, lit.pos, "INVALID_QUERY_FILTER_OPERATOR", "invalid ID field: %s" % lit.value)
        return to_id18(lit.value)
    return lit.value


def order_key(f, desc, nulls_first):
    """Sort key for one ORDER BY item: (null rank, value), nulls placed as SOQL says
    (ASC NULLS FIRST / DESC NULLS LAST by default)."""
    null_rank = 0 if nulls_first != desc else 1
    get, norm = f.getter, sort_key_fn(f)

    def key(r):
        v = get(r)
        return (null_rank, "") if v is None else (1 - null_rank, norm(v))
    return key


def run_query(org, cq, include_deleted, recs=None):
    """Evaluate a compiled query; returns the ordered list of matching records.
    `recs`: the records to query (a snapshot of cq.obj's records; default: the current ones)."""
    recs = list(cq.obj.records.values()) if recs is None else recs
    if not include_deleted:
        recs = [r for r in recs if not r.get("IsDeleted")]
    if cq.predicate:
        recs = [r for r in recs if cq.predicate(r)]
    wanted = None if cq.limit is None else cq.limit + (cq.offset or 0)
    directions = {desc for _, desc, _ in cq.order}
    if len(directions) == 1:
        # One direction for every key (the keyset case): a single composite key, and
        # with LIMIT only the first `wanted` rows need ordering.
        keys = [order_key(*item) for item in cq.order]
        key = keys[0] if len(keys) == 1 else (lambda r: tuple(k(r) for k in keys))
        desc = directions.pop()
        if wanted is not None and wanted * 4 < len(recs):
            recs = (heapq.nlargest if desc else heapq.nsmallest)(wanted, recs, key=key)
        else:
            recs.sort(key=key, reverse=desc)
    else:
        # Mixed directions: stable passes from the last key to the first.
        for f, desc, nulls_first in reversed(cq.order):
            recs.sort(key=order_key(f, desc, nulls_first), reverse=desc)
    if cq.offset:
        recs = recs[cq.offset:]
    if cq.limit is not None:
        recs = recs[:cq.limit]
    return recs


# ----------------------------------------------------------------------------
# Bulk API 2.0 query jobs
# ----------------------------------------------------------------------------
#
# POST   /services/data/vNN.0/jobs/query                 create (v47.0+), 200 + job info
# GET    /services/data/vNN.0/jobs/query                 list {done, records, nextRecordsUrl}
# GET    /services/data/vNN.0/jobs/query/{id}            job info
# PATCH  /services/data/vNN.0/jobs/query/{id}            {"state": "Aborted"}
# DELETE /services/data/vNN.0/jobs/query/{id}            204 (terminal jobs only)
# GET    /services/data/vNN.0/jobs/query/{id}/results    CSV; ?maxRecords=N&locator=L
#
# A job sits in UploadComplete for queue_delay_s, then turns InProgress: that instant is its
# snapshot (the ids and field values it will return are fixed then; later writes are not
# seen). The CSV is serialised once, in a background thread, into one buffer plus a byte
# offset per record, so serving any (locator, maxRecords) slice costs O(log n) plus the
# bytes sent. After processing_delay_s (or when serialising is done, if later) the job is
# JobComplete. Without ORDER BY the rows come in creation order: a PK-chunked scan returns Id
# order, and real Salesforce Ids grow with creation (this fake's random Ids do not), so this is
# NOT SystemModstamp order once records have been modified. When the job completes, the CSV is
# also compressed once, in blocks of gzip_block_rows rows each ending with a full flush: a gzip
# response for any set is spliced from those blocks (only its ragged ends are compressed per
# request), so gzip costs no more per request than identity.

BULK_MIN_VERSION = 47                 # jobs/query exists since API v47.0
BULK_DELIMITERS = {"COMMA": ",", "TAB": "\t", "SEMICOLON": ";", "PIPE": "|", "CARET": "^",
                   "BACKQUOTE": "`"}
BULK_LINE_ENDINGS = {"LF": "\n", "CRLF": "\r\n"}
BULK_JOB_LIFESPAN = timedelta(days=7)  # terminal jobs older than 7 days are deleted
BULK_LIST_PAGE = 1000                  # GET jobs/query returns at most 1,000 jobs per page
BULK_DAILY_JOBS = 10000                # DailyBulkV2QueryJobs
BULK_DAILY_STORAGE_MB = 976562         # DailyBulkV2QueryFileStorageMB (1 TB)
BULK_NOT_SUPPORTED_SUFFIXES = ("History", "Feed", "Share")   # "Entity ... is not supported by the Bulk API"
BULK_STATE_WORDS = {"UploadComplete": "UPLOAD_COMPLETE", "InProgress": "IN_PROGRESS",
                    "JobComplete": "JOB_COMPLETE", "Aborted": "ABORTED", "Failed": "FAILED"}
BULK_DEFAULTS = {
    "queue_delay_s": 0.1,          # UploadComplete -> InProgress (the snapshot is taken then)
    "processing_delay_s": 0.2,     # InProgress -> JobComplete (at least; serialising may take longer)
    "default_max_records": None,   # records per results response when maxRecords is not given (None = all)
    "max_records_cap": None,       # a larger maxRecords is lowered to this (None = no cap)
    "max_bytes": 1 << 30,          # a results response holds at most this many bytes (whole rows;
                                   # always at least one row)
    "quote_all": True,             # quote every field like Salesforce's own output ("Id","Name");
                                   # False = RFC 4180 minimal quoting, null = empty unquoted field
    "retries": 0,                  # reported in job info
    "gzip": True,                  # compress results when the client sends Accept-Encoding: gzip
                                   # (like Salesforce); False = always identity (less fake CPU)
    "gzip_block_rows": 2000,       # rows per pre-compressed block
}
CSV_CHUNK = 20000                      # rows serialised per batch (bounds the transient memory)
BULK_LOCK = threading.Lock()           # one serialiser at a time: the 2-core test box stays responsive


def bulk_error(status, code, message):
    """Bulk API 2.0 errors have the REST shape: [{"errorCode", "message"}]."""
    err = ApiError(status, code, message)
    err.body = [{"errorCode": code, "message": message}]
    return err


def plain_float(v):
    """Numbers as plain decimals (no exponent), like Salesforce's CSV."""
    if v != v or v in (float("inf"), float("-inf")):
        return repr(v)
    r = repr(v)
    if "e" not in r:
        return r
    out = format(Decimal(r), "f")
    return out if "." in out else out + ".0"


BOOL_TEXT = {True: "true", False: "false"}


def csv_text(f, col):
    """One column (a sequence of API values, None = null) in Bulk CSV text form; the csv module
    writes str/int/float itself (floats with repr, like Salesforce: 1234.5, 0.0)."""
    t = f.type
    if t == "boolean":
        return list(map(BOOL_TEXT.get, col))
    if t == "datetime":
        # wire form 2024-05-01T12:00:00.000+0000 -> CSV form 2024-05-01T12:00:00.000Z
        return [v[:-5] + "Z" if v and v.endswith("+0000") else v for v in col]
    if t in ("double", "currency", "percent"):
        if any(v is not None and (v >= 1e16 or v <= -1e16 or (v != 0 and -1e-4 < v < 1e-4)) for v in col):
            return [v if v is None else plain_float(v) for v in col]    # no exponents
        return col
    if t == "anyType":
        return [v if v is None or isinstance(v, str) else BOOL_TEXT[v] if isinstance(v, bool)
                else json.dumps(v) for v in col]
    return col


def csv_rows(fields, recs):
    """Rows (tuples of CSV text or None) for `recs`. Values are read record by record (one
    itemgetter call each: reading column by column over a million dicts is cache-hostile),
    converted column by column, and zipped back into rows."""
    plain = [f for f in fields if f.plain]
    if plain:
        get = itemgetter(*[f.name for f in plain])
        try:
            got = list(map(get, recs))
        except KeyError:                 # a record without some key: read it the slow way
            names = [f.name for f in plain]
            got = [tuple(r.get(n) for n in names) for r in recs]
        plain_cols = list(zip(*got)) if len(plain) > 1 else [got]
        del got
    else:
        plain_cols = []
    cols, k = [], 0
    for f in fields:
        if f.plain:
            col = plain_cols[k]
            k += 1
        else:
            get = f.getter
            col = [get(r) for r in recs]
        cols.append(csv_text(f, col))
    return zip(*cols)


class BulkJob:
    """One Bulk API 2.0 query job."""

    def __init__(self, org, job_id, operation, cq, soql, version, delimiter, line_ending):
        self.id = job_id
        self.operation = operation            # "query" | "queryAll"
        self.cq = cq
        self.obj = cq.obj
        self.soql = soql
        self.version = version                # "60.0": results must be read with the same version
        self.delimiter = delimiter            # "COMMA" ...
        self.line_ending = line_ending        # "LF" | "CRLF"
        self.created = org.now()
        self.modstamp = self.created
        self.created_by = org.user_id
        self.state = "UploadComplete"
        self.error_message = None
        self.fail_message = None              # set when /__admin/bulk fail_next_job picked this job
        self.records = 0                      # numberRecordsProcessed
        self.processing_ms = 0
        self.retries = 0
        self.t_start = None                   # monotonic time processing started
        self.header = b""                     # the CSV header row
        self.blob = None                      # every data row, serialised (bytearray)
        self.offsets = None                   # array('q'): row i = blob[offsets[i]:offsets[i+1]]
        self.gz_blocks = None                 # rows [i*gz_block, (i+1)*gz_block) deflated, full-flushed
        self.gz_block = 1
        self.quote_all = True

    def api_version_number(self):
        return float(self.version)

    def info(self, full=True, listing=False):
        """Job info in the documented key order. full: Get Job Info; listing: Get All Jobs'
        records; neither: the Create (and Abort) answer."""
        d = {"id": self.id, "operation": self.operation, "object": self.obj.name,
             "createdById": self.created_by, "createdDate": fmt_dt(self.created),
             "systemModstamp": fmt_dt(self.modstamp), "state": self.state,
             "concurrencyMode": "Parallel", "contentType": "CSV",
             "apiVersion": self.api_version_number()}
        if full or listing:
            d["jobType"] = "V2Query"
        d["lineEnding"] = self.line_ending
        d["columnDelimiter"] = self.delimiter
        if full:
            d["numberRecordsProcessed"] = self.records
            d["retries"] = self.retries
            d["totalProcessingTime"] = self.processing_ms
            if self.state == "Failed" and self.error_message:
                d["errorMessage"] = self.error_message
            d["isPkChunkingSupported"] = bool(self.obj.custom or self.obj.name in ("Account", "Contact"))
        return d

    def terminal(self):
        return self.state in ("JobComplete", "Aborted", "Failed")

    def drop_results(self):
        self.blob = self.offsets = self.gz_blocks = None

    def locator_for(self, offset):
        """Sforce-Locator of the set starting at `offset`: a pseudo-random-looking string
        (base64 of the offset, e.g. MTAwMDA for 10000) since v49.0, a number before."""
        if float(self.version) < 49:
            return str(offset)
        return base64.b64encode(str(offset).encode()).decode().rstrip("=")

    def offset_for(self, locator):
        """Offset named by a locator, or None when it names no set of this job."""
        if float(self.version) < 49:
            text = locator
        else:
            if not re.match(r"^[A-Za-z0-9+/]+$", locator):
                return None
            try:
                text = base64.b64decode(locator + "=" * (-len(locator) % 4), validate=True).decode()
            except (ValueError, UnicodeDecodeError):
                return None
        if not re.match(r"^[1-9][0-9]{0,11}$", text):
            return None
        offset = int(text)
        return offset if offset < self.records else None


class BulkEngine:
    """Timed state changes of Bulk jobs: one scheduler thread (a heap of due times); the
    serialising of a job's results runs in its own thread."""

    def __init__(self, org):
        self.org = org
        self.cond = threading.Condition()
        self.heap = []
        self.seq = 0
        self.thread = None

    def after(self, delay, fn, *args):
        with self.cond:
            self.seq += 1
            heapq.heappush(self.heap, (time.monotonic() + max(0.0, delay), self.seq, fn, args))
            if self.thread is None:
                self.thread = threading.Thread(target=self.run, name="bulk-scheduler", daemon=True)
                self.thread.start()
            self.cond.notify()

    def run(self):
        while True:
            with self.cond:
                while True:
                    now = time.monotonic()
                    if self.heap and self.heap[0][0] <= now:
                        break
                    self.cond.wait(self.heap[0][0] - now if self.heap else None)
                _, _, fn, args = heapq.heappop(self.heap)
            try:
                fn(*args)
            except Exception:
                traceback.print_exc()

    # -- the job's life ---------------------------------------------------------------

    def start(self, job):
        """UploadComplete -> InProgress; the snapshot of the records is taken now."""
        org = self.org
        with org.lock:
            if job.state != "UploadComplete" or org.bulk_jobs.get(job.id) is not job:
                return                                   # aborted or deleted meanwhile
            job.state = "InProgress"
            job.modstamp = org.now()
            job.t_start = time.monotonic()
            delay = float(org.bulk["processing_delay_s"])
            if job.fail_message is not None:
                self.after(delay, self.fail, job, job.fail_message)
                return
            if org.types.get(job.obj.name.lower()) is not job.obj:
                self.after(delay, self.fail, job, "INVALID_TYPE: sObject type '%s' is not supported."
                           % job.obj.name)
                return
            # Records are replaced, never mutated, on write: this list IS the snapshot.
            snapshot = list(job.obj.records.values())
            job.quote_all = bool(org.bulk["quote_all"])
        threading.Thread(target=self.process, args=(job, snapshot, delay), name="bulk-" + job.id,
                         daemon=True).start()

    def process(self, job, snapshot, delay):
        try:
            with BULK_LOCK:
                if job.state != "InProgress":
                    return
                recs = run_query(self.org, job.cq, job.operation == "queryAll", snapshot)
                header, blob, offsets = serialise_csv(job, recs)
                block = int(self.org.bulk["gzip_block_rows"])
                blocks = gzip_blocks(blob, offsets, block) if self.org.bulk["gzip"] else None
        except Exception as e:
            traceback.print_exc()
            self.after(0, self.fail, job, "Unexpected exception encountered in query processing: %r" % e)
            return
        with self.org.lock:
            if job.state != "InProgress":
                return
            job.header, job.blob, job.offsets, job.gz_blocks, job.gz_block = header, blob, offsets, blocks, block
        self.after(delay - (time.monotonic() - job.t_start), self.complete, job)

    def complete(self, job):
        org = self.org
        with org.lock:
            if job.state != "InProgress" or org.bulk_jobs.get(job.id) is not job:
                job.drop_results()
                return
            job.state = "JobComplete"
            job.records = len(job.offsets) - 1
            job.retries = int(org.bulk.get("retries") or 0)
            job.processing_ms = int((time.monotonic() - job.t_start) * 1000)
            job.modstamp = org.now()
            size_mb = (len(job.header) + len(job.blob) + (1 << 20) - 1) >> 20
            org.bulk_storage.append((job.modstamp, size_mb))

    def fail(self, job, message):
        org = self.org
        with org.lock:
            if job.state not in ("UploadComplete", "InProgress"):
                return
            job.state = "Failed"
            job.error_message = message
            job.processing_ms = int((time.monotonic() - (job.t_start or time.monotonic())) * 1000)
            job.modstamp = org.now()
            job.drop_results()


GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"     # no name, no mtime, OS unknown


def deflate_piece(data, level=1):
    """Raw deflate of `data` with a fresh dictionary, ending in a full flush (byte-aligned, no
    back-references across pieces): such pieces concatenate into one valid deflate stream."""
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush(zlib.Z_FULL_FLUSH)


def stored_piece(data):
    """`data` as stored (uncompressed) deflate blocks, not final: byte-aligned like a deflate_piece,
    with no compressor to set up (a query page's envelope head: ~150 bytes, fresh per answer)."""
    out = []
    for i in range(0, len(data), 65535):
        chunk = data[i:i + 65535]
        out.append(b"\x00" + struct.pack("<HH", len(chunk), len(chunk) ^ 0xFFFF) + chunk)
    return b"".join(out)


CLOSE_PIECE = deflate_piece(b"}")           # the end of a query page's JSON (Handler.page_answer)


def gzip_blocks(blob, offsets, block):
    n = len(offsets) - 1
    view = memoryview(blob)
    return [deflate_piece(view[offsets[b]:offsets[min(n, b + block)]]) for b in range(0, n, block)]


def gzip_set(header, blob, offsets, blocks, block, start, end):
    """One gzip member for rows [start, end) plus the header row: whole pre-compressed blocks
    where the set covers them, fresh pieces for the ragged ends. Returns the parts to send."""
    view = memoryview(blob)
    first = -(-start // block)                 # first block wholly inside the set
    # blocks [first, last) are wholly inside (the last block may be short: it ends the job)
    last = len(blocks) if end == len(offsets) - 1 else end // block
    parts = [GZIP_HEADER, deflate_piece(header)]
    if first < last:
        if start < first * block:
            parts.append(deflate_piece(view[offsets[start]:offsets[first * block]]))
        parts.extend(blocks[first:last])
        if last * block < end:
            parts.append(deflate_piece(view[offsets[last * block]:offsets[end]]))
    elif start < end:
        parts.append(deflate_piece(view[offsets[start]:offsets[end]]))
    parts.append(b"\x03\x00")                # final, empty block
    crc = zlib.crc32(view[offsets[start]:offsets[end]], zlib.crc32(header))
    size = len(header) + offsets[end] - offsets[start]
    parts.append(struct.pack("<II", crc, size & 0xFFFFFFFF))
    return parts


def serialise_csv(job, recs):
    """(header bytes, bytearray of all rows, array of row start offsets + total length)."""
    fields = list(job.cq.fields)
    if float(job.version) < 50:
        fields.sort(key=lambda f: f.name.lower())    # before v50.0 columns came alphabetically
    delim = BULK_DELIMITERS[job.delimiter]
    eol = BULK_LINE_ENDINGS[job.line_ending]
    rows = []
    sink = type("Sink", (), {"write": staticmethod(rows.append)})
    if job.quote_all:
        writer = csv.writer(sink, delimiter=delim, quotechar='"', doublequote=True,
                            quoting=csv.QUOTE_ALL, lineterminator=eol)
        fix_eol = None
    else:
        # The csv module quotes only characters of its line terminator: write with CRLF so a
        # lone CR or LF in a value is quoted too, then put the job's line ending back.
        writer = csv.writer(sink, delimiter=delim, quotechar='"', doublequote=True,
                            quoting=csv.QUOTE_MINIMAL, lineterminator="\r\n")
        fix_eol = eol if eol != "\r\n" else None
    writer.writerow([f.name for f in fields])
    header = (rows.pop()[:-2] + fix_eol if fix_eol else rows.pop()).encode()
    blob = bytearray()
    offsets = array("q", [0])
    total = 0
    for start in range(0, len(recs), CSV_CHUNK):
        part = recs[start:start + CSV_CHUNK]
        writer.writerows(csv_rows(fields, part))
        if fix_eol:
            encoded = [(r[:-2] + fix_eol).encode() for r in rows]
        else:
            encoded = [r.encode() for r in rows]
        rows.clear()
        ends = accumulate(map(len, encoded), initial=total)
        next(ends)                       # the first one is `total` itself, already the last offset
        offsets.extend(ends)
        total = offsets[-1]
        blob += b"".join(encoded)
    return header, blob, offsets


# ----------------------------------------------------------------------------
# HTTP handler
# ----------------------------------------------------------------------------

VERSION_PATH_RE = re.compile(r"^v(\d+)\.0$")


def version_label(v):
    n = v - 32
    return "%s '%02d" % (["Winter", "Spring", "Summer"][n % 3], 15 + n // 3)


def dumps(obj):
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


class Handler(FaultDelivery, BaseHTTPRequestHandler):
    # Answers go out in two writes (headers, body): without TCP_NODELAY a keep-alive
    # client waits ~40 ms on each for the delayed ACK.
    disable_nagle_algorithm = True
    protocol_version = "HTTP/1.1"
    server_version = "SFDC"
    org: Org = None       # set by main()
    verbose = False

    # -- plumbing --------------------------------------------------------------

    def version_string(self):
        return self.server_version

    def log_message(self, fmt, *args):
        if self.verbose:
            sys.stderr.write("fake_salesforce: " + (fmt % args) + "\n")

    def date_time_string(self, timestamp=None):
        """Date header follows the (possibly shifted) server clock; clients use it as server time."""
        return email.utils.formatdate(self.org.now().timestamp(), usegmt=True)

    def parse_request(self):
        # Called as soon as the request line is read (before headers and body): the
        # request log's `t` is this arrival time, not when the answer went out.
        self.arrived = time.time()
        return super().parse_request()

    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def do_PATCH(self):
        self.dispatch("PATCH")

    def do_DELETE(self):
        self.dispatch("DELETE")

    def do_PUT(self):
        self.dispatch("PUT")

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
        """Write a complete response (always with Content-Length, so keep-alive works).
        body: bytes, or a list of bytes-like parts written one after the other (a Bulk result
        set is sent straight from the job's buffer, without copying it)."""
        fault, self.answer_fault = getattr(self, "answer_fault", None), None
        if fault is not None:
            parts = body if isinstance(body, list) else [body]
            self.send_faulted(fault, status, b"".join(parts), ctype, headers)
            return
        parts = body if isinstance(body, list) else [body]
        length = sum(len(part) for part in parts)
        headers = dict(headers or {})
        identity = headers.pop("_identity", None)
        if length > 1024 and "Content-Encoding" not in headers and not identity \
                and "gzip" in (self.headers.get("Accept-Encoding") or ""):
            parts = [gzip.compress(b"".join(parts), compresslevel=1)]
            length = len(parts[0])
            headers.update({"Content-Encoding": "gzip", "Vary": "Accept-Encoding"})
        self.send_response(status)
        if length or status not in (204, 304):
            self.send_header("Content-Type", ctype)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0" if status in (204, 304) else str(length))
        self.status_sent = status
        # Log before the client can read the answer: a test that got a response
        # must find its request in the log.
        self.flush_log_entry()
        self.end_headers()
        if self.command != "HEAD" and status not in (204, 304):
            for part in parts:
                self.wfile.write(part)

    def flush_log_entry(self):
        entry = getattr(self, "pending_log", None)
        if entry is not None:
            self.pending_log = None
            entry["status"] = self.status_sent
            self.org.log_request(entry, classify(entry["path"]))

    def dispatch(self, method):
        self.status_sent = 0
        self.answer_fault = self.stall_until = None
        split = urlsplit(self.path)
        path, query = split.path, split.query
        body = self.read_body() if method in ("POST", "PATCH", "PUT") else b""
        if path.startswith("/__admin"):
            self.handle_admin(method, path, query, body)
            return
        self.pending_log = {"t": self.arrived, "method": method, "path": path, "query": query, "status": 0}
        try:
            self.handle_api(method, path, query, body)
        finally:
            self.flush_log_entry()      # dropped or failed requests are logged with status 0
            self.finish_fault()

    # -- public API --------------------------------------------------------------

    def handle_api(self, method, path, query, body):
        """Serve one non-admin request; returns the endpoint label for stats."""
        endpoint = classify(path)
        fault = self.org.take_fault(path + ("?" + query if query else ""))
        if fault and self.apply_fault(fault, path):
            return endpoint
        extra = {}
        try:
            if path == "/services/oauth2/token":
                self.handle_token(method, body)
                return endpoint
            if path == "/services/data" or path.startswith("/services/data/"):
                extra["Sforce-Limit-Info"] = None   # filled in after counting
                status, payload, headers = self.handle_rest(method, path, query, body)
                extra.update(headers)
                extra["Sforce-Limit-Info"] = self.org.limit_header()
                self.send(status, payload, ctype=extra.pop("Content-Type", JSON_TYPE), headers=extra)
                return endpoint
            raise not_found()
        except OAuthError as e:
            self.send(e.status, dumps(e.body), headers={"Cache-Control": "no-cache,must-revalidate,max-age=0,no-store,private"})
        except ApiError as e:
            headers = dict(e.headers)
            if "Sforce-Limit-Info" in extra:
                headers["Sforce-Limit-Info"] = self.org.limit_header()
            self.send(e.status, dumps(e.body), headers=headers)
        except Exception:
            # A bug in the fake must show up as a loud 500, not as a silently dropped connection.
            traceback.print_exc()
            self.send(500, dumps(default_error_body(500, path)))
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
        elif "body" in fault and fault["body"] is not None:
            body = fault["body"]
            payload = body.encode() if isinstance(body, str) else dumps(body)
        else:
            payload = dumps(default_error_body(status, path))
        headers = dict(fault.get("headers") or {})
        if status == 401 and path.startswith("/services/data"):
            headers.setdefault("WWW-Authenticate", "Token")
        if path.startswith("/services/data"):
            headers.setdefault("Sforce-Limit-Info", self.org.limit_header())
        if fault.get("truncate") or fault.get("stall") or fault.get("corrupt"):
            self.send_faulted(fault, status, payload, fault.get("content_type") or JSON_TYPE, headers)
            return True
        self.send(status, payload, ctype=fault.get("content_type") or JSON_TYPE, headers=headers)
        return True

    def fault_log(self, status):
        self.status_sent = status
        self.flush_log_entry()

    def fault_owner(self):
        return self.org

    def handle_token(self, method, body):
        if method != "POST":
            raise OAuthError(400, "invalid_request", "must use HTTP POST")
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        form = {}
        if ctype == "application/x-www-form-urlencoded":
            form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"),
                                                  keep_blank_values=True).items()}
        cfg = self.org.cfg
        if form.get("grant_type") != "refresh_token":
            raise OAuthError(400, "unsupported_grant_type", "grant type not supported")
        if form.get("client_id") != cfg.client_id:
            raise OAuthError(400, "invalid_client_id", "client identifier invalid")
        if form.get("client_secret") != cfg.client_secret:
            raise OAuthError(400, "invalid_client", "invalid client credentials")
        if form.get("refresh_token") != cfg.refresh_token:
            raise OAuthError(400, "invalid_grant", "expired access/refresh token")
        org = self.org
        token = org.issue_token()
        issued = str(int(org.now().timestamp() * 1000))
        ident = "%s/id/%s/%s" % (org.base_url, org.org_id, org.user_id)
        sig = base64.b64encode(hmac.new(cfg.client_secret.encode(), (ident + issued).encode(),
                                        hashlib.sha256).digest()).decode()
        self.send(200, dumps({"access_token": token, "signature": sig, "scope": "refresh_token api",
                              "instance_url": org.base_url, "id": ident, "token_type": "Bearer",
                              "issued_at": issued}),
                  headers={"Cache-Control": "no-cache,must-revalidate,max-age=0,no-store,private"})

    def authenticate(self):
        auth = self.headers.get("Authorization") or ""
        parts = auth.split(None, 1)
        if len(parts) != 2 or parts[0] not in ("Bearer", "OAuth") or not self.org.token_valid(parts[1].strip()):
            raise invalid_session()

    def handle_rest(self, method, path, query, body=b""):
        """Returns (status, body, headers) for everything under /services/data; body is bytes or
        a list of bytes-like parts (sent one after the other, without joining them)."""
        org = self.org
        if len(self.requestline) > MAX_URI_BYTES:
            raise ApiError(414, "URI_TOO_LONG", "URI Too Long")
        segs = path.split("/")[3:]          # after '', 'services', 'data'
        if segs and segs[-1] == "":
            segs = segs[:-1]
        if not segs:
            if method not in ("GET", "HEAD"):
                raise method_not_allowed(method)
            return 200, dumps([{"label": version_label(v), "url": "/services/data/v%d.0" % v,
                                "version": "%d.0" % v} for v in range(MIN_VERSION, MAX_VERSION + 1)]), {}
        self.authenticate()
        if not org.count_api_call():
            raise ApiError(403, "REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded.")
        m = VERSION_PATH_RE.match(segs[0])
        if not m or not MIN_VERSION <= int(m.group(1)) <= MAX_VERSION or "" in segs[1:]:
            raise not_found()
        version = "%s.0" % m.group(1)
        rest = segs[1:]
        params = parse_qs(query, keep_blank_values=True)
        if rest[:2] == ["jobs", "query"]:
            if int(m.group(1)) < BULK_MIN_VERSION:
                raise not_found()
            return self.handle_bulk_query(method, version, rest[2:], params, body)
        if method not in ("GET", "HEAD"):
            raise method_not_allowed(method)
        if not rest:
            return 200, dumps({k: "/services/data/v%s/%s" % (version, k) for k in
                               ("tooling", "metadata", "eclair", "folders", "prechatForms", "chatter",
                                "tabs", "appMenu", "quickActions", "queryAll", "commerce", "wave",
                                "analytics", "search", "identity", "composite", "parameterizedSearch",
                                "theme", "nouns", "recent", "connect", "licensing", "limits",
                                "process", "async-queries", "query", "jobs", "sobjects", "actions",
                                "support")}), {}
        head = rest[0]
        if head == "sobjects":
            return self.handle_sobjects(version, rest[1:], params)
        if head in ("query", "queryAll"):
            if len(rest) == 1:
                return self.handle_query(version, params, head == "queryAll")
            if len(rest) == 2:
                return self.handle_query_more(version, rest[1])
            raise not_found()
        if head == "limits":
            if len(rest) == 1:
                return 200, dumps(self.limits_body()), {}
            if len(rest) == 2 and rest[1] == "recordCount":
                return self.handle_record_count(params)
        raise not_found()

    # -- sobjects -------------------------------------------------------------------

    def handle_sobjects(self, version, rest, params):
        org = self.org
        if not rest:
            body = {"encoding": "UTF-8", "maxBatchSize": 200,
                    "sobjects": [t.global_entry(version) for t in sorted(org.types.values(), key=lambda t: t.name)]}
            return 200, dumps(body), {}
        obj = org.sobject(rest[0])
        if obj is None:
            raise not_found()
        if len(rest) == 1:
            recent = []
            return 200, dumps({"objectDescribe": obj.global_entry(version), "recentItems": recent}), {}
        action = rest[1]
        if len(rest) == 2 and action == "describe":
            return self.handle_describe(obj, version)
        if len(rest) == 2 and action == "deleted":
            return 200, dumps(self.get_deleted(obj, params)), {}
        if len(rest) == 2 and action == "updated":
            return 200, dumps(self.get_updated(obj, params)), {}
        if len(rest) == 2 and obj.retrieveable:
            return self.retrieve(obj, version, action, params)
        raise not_found()

    def handle_describe(self, obj, version):
        last_mod = email.utils.format_datetime(obj.schema_changed, usegmt=True)
        ims = self.headers.get("If-Modified-Since")
        if ims:
            try:
                since = email.utils.parsedate_to_datetime(ims)
                if since.tzinfo is None:
                    since = since.replace(tzinfo=UTC)
                if obj.schema_changed <= since:
                    return 304, b"", {"Last-Modified": last_mod}
            except (TypeError, ValueError):
                pass
        return 200, obj.describe_bytes(version), {"Last-Modified": last_mod}

    def retrieve(self, obj, version, rec_id, params):
        rec = obj.records.get(to_id18(rec_id)) if ID_RE.match(rec_id) else None
        if rec is None or rec["IsDeleted"]:
            raise not_found()
        wanted = params.get("fields", [""])[0]
        if wanted:
            fields = []
            for name in wanted.split(","):
                f = obj.field(name.strip())
                if f is None:
                    raise ApiError(400, "INVALID_FIELD", "No such column '%s' on sobject of type %s"
                                   % (name.strip(), obj.name))
                fields.append(f)
        else:
            fields = [f for f in obj.fields if not f.hidden]
        return 200, dumps(render_records(obj, [rec], fields, version)[0]), {}

    def replication_window(self, obj, params, max_days):
        """Validate start/end like getDeleted/getUpdated: both required, truncated to the minute."""
        if not obj.replicateable:
            raise ApiError(400, "INVALID_TYPE_FOR_OPERATION",
                           "entity type %s does not support replication" % obj.name)
        raw = {}
        for name in ("start", "end"):
            values = params.get(name)
            if not values or not values[0]:
                raise ApiError(400, "MISSING_ARGUMENT", "%s was not specified" % name)
            dt = parse_iso(values[0])
            if dt is None:
                raise ApiError(400, "INVALID_REPLICATION_DATE",
                               "Invalid %s date: %s" % (name, values[0]))
            raw[name] = floor_minute(dt)
        start, end = raw["start"], raw["end"]
        if end - start < timedelta(minutes=1):
            raise ApiError(400, "INVALID_REPLICATION_DATE",
                           "startDate must be at least one minute greater than endDate")
        now = self.org.now()
        oldest = now.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=max_days)
        if start < oldest:
            raise ApiError(400, "INVALID_REPLICATION_DATE",
                           "startDate cannot be more than %d days ago" % max_days)
        # Never claim coverage of the future: a delete in the rest of this minute must be
        # found by the next call, which starts at latestDateCovered.
        covered = min(end, floor_minute(now))
        return start, end, covered

    def get_deleted(self, obj, params):
        org = self.org
        start, end, covered = self.replication_window(obj, params, DELETED_WINDOW_DAYS)
        with org.lock:
            earliest = org.now().replace(hour=0, minute=0, second=0, microsecond=0) - \
                timedelta(days=DELETED_WINDOW_DAYS)
            if org.earliest_deleted and org.earliest_deleted > earliest:
                earliest = org.earliest_deleted
                if start < earliest and org.purge_mode == "error":
                    raise ApiError(400, "INVALID_REPLICATION_DATE",
                                   "startDate before earliest date available: %s" % fmt_dt(earliest))
            hits = [e for e in org.delete_log if e["object"] == obj.name
                    and max(start, earliest) <= e["at"] < covered]
        if len(hits) > MAX_REPLICATION_IDS:
            raise ApiError(400, "EXCEEDED_ID_LIMIT", "Too many ids were requested, please narrow "
                           "the date range. Maximum is %d" % MAX_REPLICATION_IDS)
        hits.sort(key=lambda e: (e["at"], e["id"]))
        return {"deletedRecords": [{"id": e["id"], "deletedDate": fmt_dt(e["at"])} for e in hits],
                "earliestDateAvailable": fmt_dt(floor_minute(earliest)),
                "latestDateCovered": fmt_dt(covered)}

    def get_updated(self, obj, params):
        start, end, covered = self.replication_window(obj, params, UPDATED_WINDOW_DAYS)
        lo, hi = fmt_dt(start), fmt_dt(covered)
        ids = [r["Id"] for r in list(obj.records.values())
               if not r["IsDeleted"] and lo <= r.get("SystemModstamp", "") < hi]
        if len(ids) > MAX_REPLICATION_IDS:
            raise ApiError(400, "EXCEEDED_ID_LIMIT", "Too many ids were requested, please narrow "
                           "the date range. Maximum is %d" % MAX_REPLICATION_IDS)
        return {"ids": ids, "latestDateCovered": hi}

    # -- query --------------------------------------------------------------------

    def batch_size(self):
        m = re.search(r"batchSize\s*=\s*(\d+)", self.headers.get("Sforce-Query-Options") or "", re.I)
        size = int(m.group(1)) if m else DEFAULT_BATCH
        # A hint, not a contract: out-of-range values are clamped, and the admin page cap
        # imitates Salesforce returning smaller pages for wide/complex records.
        size = max(MIN_BATCH, min(MAX_BATCH, size))
        return min(size, self.org.page_cap) if self.org.page_cap else size

    def handle_query(self, version, params, include_deleted):
        org = self.org
        soql = params.get("q", [""])[0]
        if not soql.strip():
            raise ApiError(400, "MALFORMED_QUERY", "A query string has to be specified")
        cq = compile_soql(org, soql)
        with org.lock:
            if cq.count:
                recs = run_query(org, cq, include_deleted)
                if cq.count_field is None:
                    return 200, dumps({"totalSize": len(recs), "done": True, "records": []}), {}
                n = sum(1 for r in recs if cq.count_field.getter(r) is not None)
                return 200, dumps({"totalSize": 1, "done": True, "records": [
                    {"attributes": {"type": "AggregateResult"}, "expr0": n}]}), {}
            recs, ids = org.query_result(cq, soql, include_deleted)
            batch = self.batch_size()
            locator = None
            if len(ids) > batch:
                locator = self.new_locator(cq, ids, batch, include_deleted, recs)
        return self.page_answer(version, cq.obj, cq.fields, recs[:batch], len(ids), locator, batch)

    def new_locator(self, cq, ids, batch, include_deleted, recs):
        """A query locator: the ids fixed now; `recs` (their records now) serve its pages for as
        long as nothing has been written (write generation `gen`)."""
        org = self.org
        loc_id = org.ids.new("01g")
        org.locators[loc_id] = {"obj": cq.obj, "fields": cq.fields, "ids": ids, "batch": batch,
                                "include_deleted": include_deleted, "created": org.now(),
                                "recs": recs, "gen": org.write_gen}
        if len(org.locators) > 5000:            # bound memory: drop the oldest cursors
            for old in list(org.locators)[:1000]:
                del org.locators[old]
        return loc_id

    def handle_query_more(self, version, token):
        org = self.org
        m = re.match(r"^([A-Za-z0-9]{15,18})-(\d+)$", token)
        if not m:
            raise not_found()
        with org.lock:
            loc = org.locators.get(m.group(1))
            offset = int(m.group(2))
            if loc is None or org.now() - loc["created"] > LOCATOR_LIFETIME \
                    or offset <= 0 or offset >= len(loc["ids"]):
                raise ApiError(400, "INVALID_QUERY_LOCATOR", "invalid query locator")
            batch, obj = loc["batch"], loc["obj"]
            # The id list was fixed when the query ran; values are read now, and rows
            # deleted since then are skipped (their slot stays, so pages can be short).
            # Nothing written since the query ran: its records are still the current ones.
            if loc["recs"] is not None and loc["gen"] == org.write_gen:
                recs = loc["recs"][offset:offset + batch]
            else:
                loc["recs"] = None                  # stale for good: let the old records go
                got = map(obj.records.get, loc["ids"][offset:offset + batch])
                if loc["include_deleted"]:
                    recs = [rec for rec in got if rec is not None]
                else:
                    recs = [rec for rec in got if rec is not None and not rec["IsDeleted"]]
            more = m.group(1) if offset + batch < len(loc["ids"]) else None
        return self.page_answer(version, obj, loc["fields"], recs, len(loc["ids"]), more, offset + batch)

    def page_answer(self, version, obj, fields, recs, total, locator, next_offset):
        """(200, body parts, headers) of a query page: the envelope around the page's cached
        records array. With Accept-Encoding: gzip (and more than 1 KB, as send() would), one gzip
        member spliced from deflate pieces: the envelope head's (stored, fresh), the records array's
        (cached with the page), the closing brace's; CRC and size over the same bytes as the
        identity answer. A fault on the real answer gets the identity bytes (send_faulted)."""
        head = {"totalSize": total, "done": locator is None}
        if locator:
            head["nextRecordsUrl"] = "/services/data/v%s/query/%s-%d" % (version, locator, next_offset)
        head = dumps(head)[:-1] + b',"records":'          # keeps the key order: records last
        page = self.org.page(obj, recs, fields, version)
        raw = page.raw
        size = len(head) + len(raw) + 1
        if size <= 1024 or getattr(self, "answer_fault", None) is not None \
                or "gzip" not in (self.headers.get("Accept-Encoding") or ""):
            return 200, [head, raw, b"}"], {}
        piece = page.piece
        if piece is None:
            piece = page.piece = deflate_piece(raw, self.org.query_gzip_level)
        crc = zlib.crc32(b"}", zlib.crc32(raw, zlib.crc32(head)))
        body = [GZIP_HEADER + stored_piece(head), piece, CLOSE_PIECE + b"\x03\x00"
                + struct.pack("<II", crc, size & 0xFFFFFFFF)]
        return 200, body, {"Content-Encoding": "gzip", "Vary": "Accept-Encoding"}

    # -- Bulk API 2.0 query jobs ---------------------------------------------------------

    def handle_bulk_query(self, method, version, rest, params, body):
        org = self.org
        if not rest:
            if method == "POST":
                return self.bulk_create(version, body)
            if method in ("GET", "HEAD"):
                return self.bulk_list(version, params)
            raise ApiError(405, "METHOD_NOT_ALLOWED",
                           "HTTP Method '%s' not allowed. Allowed are GET,POST" % method)
        if len(rest) > 2 or (len(rest) == 2 and rest[1] != "results"):
            raise not_found()
        if len(rest) == 2:
            if method not in ("GET", "HEAD"):
                raise method_not_allowed(method)
            return self.bulk_results(rest[0], version, params)
        with org.lock:
            job = org.bulk_job(rest[0])
            if job is None:
                raise not_found()
            if method in ("GET", "HEAD"):
                return 200, dumps(job.info()), {}
            if method == "PATCH":
                return self.bulk_abort(job, body)
            if method == "DELETE":
                if not job.terminal():
                    raise bulk_error(400, "API_ERROR", "Error encountered when deleting the job because "
                                                       "the job is not terminated")
                del org.bulk_jobs[job.id]
                job.state = "Deleted"
                job.drop_results()
                return 204, b"", {}
        raise ApiError(405, "METHOD_NOT_ALLOWED",
                       "HTTP Method '%s' not allowed. Allowed are GET,PATCH,DELETE" % method)

    def bulk_create(self, version, body):
        org = self.org
        try:
            spec = json.loads(body or b"null")
        except ValueError as e:
            raise bulk_error(400, "JSON_PARSER_ERROR", "The request body is not valid JSON: %s" % e)
        if not isinstance(spec, dict):
            raise bulk_error(400, "JSON_PARSER_ERROR", "The request body must be a JSON object")
        operation = spec.get("operation")
        if operation not in ("query", "queryAll"):
            raise bulk_error(400, "INVALIDJOB", "InvalidJob : Invalid operation: %s (query jobs support "
                                                "query and queryAll)" % (operation,))
        soql = spec.get("query")
        if not isinstance(soql, str) or not soql.strip():
            raise bulk_error(400, "INVALIDJOB", "InvalidJob : A query string has to be specified")
        for key, allowed, default in (("contentType", ("CSV",), "CSV"),
                                      ("columnDelimiter", tuple(BULK_DELIMITERS), "COMMA"),
                                      ("lineEnding", tuple(BULK_LINE_ENDINGS), "LF")):
            value = spec.get(key, default)
            if value not in allowed:
                raise bulk_error(400, "JSON_PARSER_ERROR",
                                 "Cannot deserialize instance of %s from VALUE_STRING value %s or request may "
                                 "be missing a required field" % (key, json.dumps(value)))
        cq = self.bulk_compile(soql)
        with org.lock:
            used = org.bulk_jobs_used()
            if used >= org.bulk_jobs_max:
                raise bulk_error(400, "LIMIT_EXCEEDED", "Max bulk v2 query jobs (%d) per 24 hrs has been "
                                                        "reached (%d)" % (org.bulk_jobs_max, used + 1))
            if org.bulk_storage_used() >= org.bulk_storage_max:
                raise bulk_error(400, "LIMIT_EXCEEDED", "Max bulk v2 query result size stored (%d) kb per "
                                                        "24 hrs has been exceeded"
                                 % (org.bulk_storage_max * 1024))
            job = BulkJob(org, org.bulk_ids.new("750"), operation, cq, soql, version,
                          spec.get("columnDelimiter", "COMMA"), spec.get("lineEnding", "LF"))
            if org.bulk_fail:
                job.fail_message = org.bulk_fail.pop(0)
            org.bulk_jobs[job.id] = job
            org.bulk_job_times.append(job.created)
            org.bulk_engine.after(float(org.bulk["queue_delay_s"]), org.bulk_engine.start, job)
            return 200, dumps(job.info(full=False)), {}

    def bulk_compile(self, soql):
        """Validate SOQL like the REST query, plus what Bulk API 2.0 query does not support."""
        org = self.org
        head = re.match(r"(?is)^\s*select\b(.*?)\bfrom\b", soql)
        if head and re.search(r"(?i)\(\s*select\b", head.group(1)):
            raise bulk_error(400, "FEATURENOTENABLED", "Aggregate Relationships not supported in Bulk V2 "
                                                       "Query with CSV content type")
        cq = compile_soql(org, soql)
        if cq.obj.name.endswith(BULK_NOT_SUPPORTED_SUFFIXES):
            raise bulk_error(400, "INVALIDENTITY", "Entity '%s' is not supported by the Bulk API."
                             % cq.obj.name)
        if cq.count:
            raise bulk_error(400, "FEATURENOTENABLED", "Aggregate queries are not supported in Bulk V2 "
                                                       "Query")
        if cq.offset is not None:
            raise bulk_error(400, "FEATURENOTENABLED", "OFFSET is not supported in Bulk V2 Query")
        if any(f.type in ("address", "location") for f in cq.fields):
            raise bulk_error(400, "FEATURENOTENABLED", "Selecting compound data not supported in Bulk Query")
        return cq

    def bulk_list(self, version, params):
        org = self.org

        def param(name):
            return params.get(name, [None])[0]
        job_type, mode, pk = param("jobType"), param("concurrencyMode"), param("isPkChunkingEnabled")
        if job_type not in (None, "V2Query", "Classic", "V2Ingest", "BigObjectIngest"):
            raise bulk_error(400, "INVALIDJOB", "InvalidJob : Invalid jobType: %s" % job_type)
        if mode is not None and mode.lower() not in ("parallel", "serial"):
            raise bulk_error(400, "INVALIDJOB", "InvalidJob : Invalid concurrencyMode: %s" % mode)
        if pk is not None and pk.lower() not in ("true", "false"):
            raise bulk_error(400, "INVALIDJOB", "InvalidJob : Invalid isPkChunkingEnabled: %s" % pk)
        start = 0
        loc = param("queryLocator")
        if loc is not None:
            m = re.match(r"^01g[A-Za-z0-9]{12,15}-(\d+)$", loc)
            if not m:
                raise ApiError(400, "INVALID_QUERY_LOCATOR", "invalid query locator")
            start = int(m.group(1))
        with org.lock:
            jobs = [j for j in list(org.bulk_jobs.values()) if org.bulk_job(j.id) is j]
        # Only V2 query jobs live here; PK chunking is a Bulk API (1.0) feature.
        if job_type not in (None, "V2Query") or (mode or "parallel").lower() != "parallel" \
                or (pk or "false").lower() == "true":
            jobs = []
        page = jobs[start:start + BULK_LIST_PAGE]
        more = start + BULK_LIST_PAGE < len(jobs)
        out = {"done": not more, "records": [j.info(full=False, listing=True) for j in page],
               "nextRecordsUrl": None}
        if more:
            query = {k: v[0] for k, v in params.items() if k != "queryLocator"}
            query["queryLocator"] = "01gHp0000000BuLK-%d" % (start + BULK_LIST_PAGE)
            out["nextRecordsUrl"] = "/services/data/v%s/jobs/query?%s" % (version, urlencode(query))
        return 200, dumps(out), {}

    def bulk_abort(self, job, body):
        try:
            spec = json.loads(body or b"null")
        except ValueError as e:
            raise bulk_error(400, "JSON_PARSER_ERROR", "The request body is not valid JSON: %s" % e)
        state = spec.get("state") if isinstance(spec, dict) else None
        if state != "Aborted":
            raise bulk_error(400, "INVALIDJOBSTATE", "InvalidJobState : Query jobs can only be changed to "
                                                     "the Aborted state, not %s" % json.dumps(state))
        if job.terminal():
            word = {"JobComplete": "Completed"}.get(job.state, job.state)
            raise bulk_error(400, "INVALIDJOBSTATE", "Aborting already %s Job not allowed" % word)
        job.state = "Aborted"
        job.modstamp = self.org.now()
        job.drop_results()
        d = job.info(full=False)
        return 200, dumps({k: d[k] for k in ("id", "operation", "object", "createdById", "createdDate",
                                             "systemModstamp", "state", "concurrencyMode", "contentType",
                                             "apiVersion")}), {}

    def bulk_results(self, job_id, version, params):
        """One set of a completed job's CSV. The slice is chosen under the org lock; compressing
        (when asked for) happens outside it."""
        org = self.org
        with org.lock:
            job = org.bulk_job(job_id)
            if job is None:
                raise not_found()
            start, end, headers = self.bulk_result_set(job, version, params)
            n, offsets, blob, header, blocks = job.records, job.offsets, job.blob, job.header, job.gz_blocks
            block, use_gzip = job.gz_block, org.bulk["gzip"]
        if blocks is not None and use_gzip and "gzip" in (self.headers.get("Accept-Encoding") or ""):
            body = gzip_set(header, blob, offsets, blocks, block, start, end)
            headers.update({"Content-Encoding": "gzip", "Vary": "Accept-Encoding"})
        else:
            body = [header, memoryview(blob)[offsets[start]:offsets[end]]] if n else [header]
            headers["_identity"] = "1"             # send() must not compress it (gzip off, or not asked)
        headers["Content-Type"] = "text/csv; charset=UTF-8"
        return 200, body, headers

    def bulk_result_set(self, job, version, params):
        """(first row, end row, headers) of the set a results request asks for."""
        org = self.org
        if version != job.version:
            raise bulk_error(409, "API_ERROR", "Use the API version the job was created with (%s) to get its "
                                               "results, not %s" % (job.version, version))
        if job.state != "JobComplete":
            raise bulk_error(412, "JOB_NOT_COMPLETE", "can only download query results of successfully "
                                                      "completed bulk job with status: JOB_COMPLETE. Current "
                                                      "status: %s" % BULK_STATE_WORDS.get(job.state, job.state))
        cfg = org.bulk
        raw = params.get("maxRecords", [None])[0]
        if raw is None or raw == "":
            want = cfg["default_max_records"]
        else:
            if not re.match(r"^[0-9]{1,10}$", raw) or int(raw) <= 0:
                raise bulk_error(400, "INVALIDPARAMETERVALUE", "Invalid value for maxRecords: %s. "
                                                               "It must be a positive integer." % raw)
            want = int(raw)
        if cfg["max_records_cap"] and (want is None or want > cfg["max_records_cap"]):
            want = int(cfg["max_records_cap"])
        locator = params.get("locator", [""])[0]
        start = 0
        if locator:
            start = job.offset_for(locator)
            if start is None:
                raise bulk_error(400, "INVALIDLOCATOR", "Invalid locator: %s" % locator)
        n, offsets = job.records, job.offsets
        end = n if want is None else min(n, start + want)
        cap = cfg["max_bytes"]
        if cap and end > start + 1 and offsets[end] - offsets[start] + len(job.header) > cap:
            # Whole rows only, at least one.
            end = max(start + 1, bisect.bisect_right(offsets, offsets[start] + cap - len(job.header),
                                                     start + 1, end + 1) - 1)
        headers = {"Sforce-Locator": job.locator_for(end) if end < n else "null",
                   "Sforce-NumberOfRecords": str(end - start)}
        return start, end, headers

    # -- limits ---------------------------------------------------------------------

    def limits_body(self):
        org = self.org
        remaining = max(0, org.api_max - org.api_used)
        with org.lock:
            return self.limits_locked(org, remaining)

    @staticmethod
    def limits_locked(org, remaining):

        def pair(mx, rem=None):
            return {"Max": mx, "Remaining": mx if rem is None else rem}
        return {
            "ActiveScratchOrgs": pair(3), "AnalyticsExternalDataSizeMB": pair(40960),
            "ConcurrentAsyncGetReportInstances": pair(200), "ConcurrentSyncReportRuns": pair(20),
            "DailyApiRequests": pair(org.api_max, remaining), "DailyAsyncApexExecutions": pair(250000),
            "DailyBulkApiBatches": pair(15000),
            "DailyBulkV2QueryFileStorageMB": pair(org.bulk_storage_max,
                                                  max(0, org.bulk_storage_max - org.bulk_storage_used())),
            "DailyBulkV2QueryJobs": pair(org.bulk_jobs_max, max(0, org.bulk_jobs_max - org.bulk_jobs_used())),
            "DailyDurableStreamingApiEvents": pair(1000000),
            "DailyStreamingApiEvents": pair(1000000), "DailyWorkflowEmails": pair(2000000),
            "DataStorageMB": pair(1024, 1000), "FileStorageMB": pair(10240, 10200),
            "HourlyDashboardRefreshes": pair(200), "HourlyODataCallout": pair(20000),
            "HourlySyncReportRuns": pair(500), "MassEmail": pair(5000), "SingleEmail": pair(5000),
        }

    def handle_record_count(self, params):
        names = [n for n in params.get("sObjects", [""])[0].split(",") if n]
        objs = [self.org.sobject(n) for n in names] if names else \
            [t for t in self.org.types.values() if t.queryable]
        out = [{"count": sum(1 for r in list(t.records.values()) if not r["IsDeleted"]), "name": t.name}
               for t in objs if t is not None]
        return 200, dumps({"sObjects": out}), {}

    # -- admin ------------------------------------------------------------------------

    def handle_admin(self, method, path, query, body):
        try:
            payload = json.loads(body) if body.strip() else {}
        except ValueError:
            self.send(400, dumps({"error": "body is not JSON"}))
            return
        params = {k: v[0] for k, v in parse_qs(query).items()}
        try:
            status, result = admin_route(self.org, method, path.rstrip("/").split("/")[2:], params, payload)
        except AdminError as e:
            status, result = e.status, {"error": str(e)}
        except Exception as e:
            traceback.print_exc()
            status, result = 500, {"error": "fake_salesforce bug: %r" % e}
        self.send(status, dumps(result))


def method_not_allowed(method):
    return ApiError(405, "METHOD_NOT_ALLOWED", "HTTP Method '%s' not allowed. Allowed are HEAD,GET" % method)


def classify(path):
    """Endpoint label for /__admin/stats."""
    if path == "/services/oauth2/token":
        return "token"
    parts = [p for p in path.split("/") if p]
    if parts[:2] != ["services", "data"]:
        return "other"
    rest = parts[3:]
    if len(parts) <= 2:
        return "versions"
    if not rest:
        return "resources"
    if rest[0] in ("query", "queryAll"):
        return rest[0] if len(rest) == 1 else "queryMore"
    if rest[0] == "sobjects":
        if len(rest) == 1:
            return "describeGlobal"
        if len(rest) >= 3 and rest[2] in ("describe", "deleted", "updated"):
            return rest[2]
        return "sobject"
    if rest[0] == "limits":
        return "limits"
    if rest[:2] == ["jobs", "query"]:
        return {2: "bulkQueryJobs", 3: "bulkQueryJob"}.get(len(rest), "bulkQueryResults")
    return "other"


def render_records(obj, recs, fields, version):
    """Records as the REST API returns them: attributes first, then fields in SELECT order."""
    prefix = "/services/data/v%s/sobjects/%s/" % (version, obj.name)
    getters = [(f.name, f.getter) for f in fields]
    out = []
    for r in recs:
        d = {"attributes": {"type": obj.name, "url": prefix + r["Id"]}}
        for name, get in getters:
            d[name] = get(r)
        out.append(d)
    return out


def default_error_body(status, path):
    """What Salesforce sends for a given status when a fault has no explicit body."""
    if path.startswith("/services/oauth2"):
        if status >= 500:
            return {"error": "unknown_error", "error_description": "retry your request"}
        return {"error": "invalid_grant", "error_description": "expired access/refresh token"}
    table = {
        400: ("MALFORMED_QUERY", "Bad request"),
        401: ("INVALID_SESSION_ID", "Session expired or invalid"),
        403: ("REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded."),
        404: ("NOT_FOUND", "The requested resource does not exist"),
        500: ("UNKNOWN_EXCEPTION", "An unexpected error occurred. Please include this ErrorId if you "
                                   "contact support: 1387914624-52417 (-1181116375)"),
        502: ("SERVER_UNAVAILABLE", "Server temporarily unavailable. Please try again later."),
        503: ("SERVER_UNAVAILABLE", "Server temporarily unavailable. Please try again later."),
        504: ("SERVER_UNAVAILABLE", "Server temporarily unavailable. Please try again later."),
    }
    code, message = table.get(status, ("UNKNOWN_EXCEPTION", "HTTP %d" % status))
    return [{"message": message, "errorCode": code}]


def admin_record_view(obj, rec):
    """Full field set as the API would return it, without attributes."""
    return {f.name: f.getter(rec) for f in obj.fields if not f.hidden}


def admin_route(org, method, parts, params, payload):
    """Dispatch /__admin/...; returns (status, JSON-able result)."""
    if not parts:
        parts = [""]
    key = (method, parts[0])
    n = len(parts)
    if key == ("GET", ""):
        return 200, ADMIN_HELP
    if parts[0] == "objects":
        if method == "GET" and n == 1:
            return 200, org.list_custom_objects()
        if method == "POST" and n == 1:
            return 201, org.add_custom_object(payload)
        if method == "DELETE" and n == 2:
            return 200, org.drop_custom_object(parts[1])
    if parts[0] == "records" and n >= 2:
        obj = org.sobject(parts[1])
        if obj is None:
            raise AdminError(404, "unknown sObject %s" % parts[1])
        if method == "POST" and n == 2:
            return 201, admin_record_view(obj, org.create(obj.name, payload))
        if method == "GET" and n == 2:
            with org.lock:
                recs = [r for r in obj.records.values()
                        if params.get("include_deleted") == "1" or not r["IsDeleted"]]
            return 200, [admin_record_view(obj, r) for r in sorted(recs, key=lambda r: r["Id"])]
        if method == "GET" and n == 3:
            rec = obj.records.get(to_id18(parts[2]))
            if rec is None:
                raise AdminError(404, "no %s record %s" % (obj.name, parts[2]))
            return 200, admin_record_view(obj, rec)
        if method == "PATCH" and n == 3:
            rec = org.update(obj.name, parts[2], payload, bump=params.get("bump", "1") != "0")
            return 200, admin_record_view(obj, rec)
        if method == "DELETE" and n == 3:
            return 200, org.delete(obj.name, parts[2], params.get("hard") == "1")
    if key == ("POST", "bulk_update") and n == 2:
        ids, count = payload.get("ids"), payload.get("count")
        if (ids is None) == (count is None):
            raise AdminError(400, "give exactly one of ids or count")
        return 200, org.bulk_update(parts[1], ids, count, payload.get("fields") or {})
    if key == ("POST", "undelete") and n == 3:
        obj = org.writable_type(parts[1])
        return 200, admin_record_view(obj, org.undelete(obj.name, parts[2]))
    if key == ("POST", "empty_recycle_bin"):
        return 200, {"purged": org.empty_recycle_bin()}
    if key == ("GET", "delete_log"):
        with org.lock:
            return 200, [{"object": e["object"], "id": e["id"], "deletedDate": fmt_dt(e["at"])}
                         for e in org.delete_log]
    if key == ("POST", "expire_tokens"):
        with org.lock:
            n_tokens = len(org.tokens)
            org.tokens.clear()
        return 200, {"expired": n_tokens}
    if key == ("POST", "expire_locators"):
        with org.lock:
            n_locs = len(org.locators)
            org.locators.clear()
        return 200, {"expired": n_locs}
    if key == ("POST", "set_earliest_deleted"):
        at = parse_any_dt(payload.get("at"))
        mode = payload.get("mode", "error")
        if mode not in ("error", "report"):
            raise AdminError(400, "mode must be 'error' or 'report'")
        with org.lock:
            org.earliest_deleted, org.purge_mode = floor_minute(at), mode
            # The purged part of the delete log is gone for good.
            org.delete_log = [e for e in org.delete_log if e["at"] >= org.earliest_deleted]
        return 200, {"earliestDateAvailable": fmt_dt(org.earliest_deleted), "mode": mode}
    if parts[0] == "faults":
        return admin_faults(org, method, payload)
    if parts[0] == "requests":
        with org.lock:
            if method == "DELETE":
                cleared = len(org.request_log)
                org.request_log = []
                return 200, {"cleared": cleared}
            if method == "GET":
                return 200, list(org.request_log)
    if key == ("GET", "stats"):
        with org.lock:
            return 200, {
                "requests": dict(org.endpoint_counts),
                "total_requests": sum(org.endpoint_counts.values()),
                "api_usage": {"used": org.api_used, "max": org.api_max},
                "tokens_issued": org.tokens_issued, "tokens_active": len(org.tokens),
                "locators": len(org.locators),
                "records": {t.name: sum(1 for r in t.records.values() if not r["IsDeleted"])
                            for t in org.types.values()},
                "recycle_bin": {t.name: sum(1 for r in t.records.values() if r["IsDeleted"])
                                for t in org.types.values()},
                "delete_log": len(org.delete_log),
            }
    if key == ("POST", "limits"):
        with org.lock:
            if "used" in payload:
                org.api_used = int(payload["used"])
            if "max" in payload:
                org.api_max = int(payload["max"])
            return 200, {"used": org.api_used, "max": org.api_max}
    if key == ("POST", "query_options"):
        with org.lock:
            cap = payload.get("page_cap")
            org.page_cap = int(cap) if cap else None
            return 200, {"page_cap": org.page_cap}
    if key == ("POST", "clock"):
        with org.lock:
            if "now" in payload:
                org.clock_offset = (parse_any_dt(payload["now"]) - datetime.now(UTC)).total_seconds()
            elif "offset" in payload:
                org.clock_offset = float(payload["offset"])
            return 200, {"now": fmt_dt(org.now()), "offset": org.clock_offset}
    if parts[0] == "fields":
        if method == "POST" and n == 2:
            return 201, org.add_field(parts[1], payload)
        if method == "DELETE" and n == 3:
            return 200, org.remove_field(parts[1], parts[2])
    if parts[0] == "bulk":
        return admin_bulk(org, method, parts[1:], payload)
    if key == ("POST", "reset"):
        cfg = org.cfg
        with org.lock:
            org.seed_data(int(payload.get("records", cfg.records)), int(payload.get("accounts", cfg.accounts)),
                          int(payload.get("seed", cfg.seed)), int(payload.get("deleted", cfg.deleted)))
            org.faults, org.request_log, org.endpoint_counts = [], [], {}
            org.api_used, org.api_max, org.clock_offset = 0, cfg.daily_limit, 0.0
            org.page_cap = None
            return 200, {"records": {t.name: len(t.records) for t in org.types.values()}}
    raise AdminError(404, "no admin endpoint %s /__admin/%s" % (method, "/".join(parts)))


BULK_ADMIN_NUMBERS = {"queue_delay_s": float, "processing_delay_s": float, "default_max_records": int,
                      "max_records_cap": int, "max_bytes": int, "retries": int, "gzip_block_rows": int}


def admin_bulk_view(org):
    with org.lock:
        jobs = [j for j in list(org.bulk_jobs.values()) if org.bulk_job(j.id) is j]
        return {
            "settings": dict(org.bulk),
            "fail_next_jobs": list(org.bulk_fail),
            "daily_jobs": {"used": org.bulk_jobs_used(), "max": org.bulk_jobs_max},
            "daily_storage_mb": {"used": org.bulk_storage_used(), "max": org.bulk_storage_max},
            "jobs": [{"id": j.id, "state": j.state, "operation": j.operation, "object": j.obj.name,
                      "query": j.soql, "apiVersion": j.version, "records": j.records,
                      "bytes": (len(j.header) + len(j.blob)) if j.blob is not None else None,
                      "errorMessage": j.error_message} for j in jobs],
        }


def admin_bulk(org, method, parts, payload):
    """/__admin/bulk: Bulk API 2.0 settings, failures, daily allocations, job expiry."""
    if method == "GET" and not parts:
        return 200, admin_bulk_view(org)
    if method == "POST" and parts == ["expire"]:
        with org.lock:
            jobs = list(org.bulk_jobs.values())
            for job in jobs:
                job.state = "Deleted"
                job.drop_results()
            org.bulk_jobs = {}
        return 200, {"expired": len(jobs)}
    if method == "POST" and parts == ["reset"]:
        org.reset_bulk(org.seed)
        return 200, admin_bulk_view(org)
    if method != "POST" or parts:
        raise AdminError(404, "no admin endpoint %s /__admin/bulk/%s" % (method, "/".join(parts)))
    if not isinstance(payload, dict):
        raise AdminError(400, "body must be a JSON object")
    known = set(BULK_ADMIN_NUMBERS) | {"quote_all", "gzip", "fail_next_job", "fail_count", "jobs_max", "jobs_used",
                                       "storage_max_mb", "storage_used_mb"}
    unknown = sorted(set(payload) - known)
    if unknown:
        raise AdminError(400, "unknown bulk settings %s (known: %s)" % (unknown, sorted(known)))
    with org.lock:
        for key, conv in BULK_ADMIN_NUMBERS.items():
            if key in payload:
                value = payload[key]
                if value is None and key in ("default_max_records", "max_records_cap", "max_bytes"):
                    org.bulk[key] = None
                    continue
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 \
                        or (conv is int and value != int(value)):
                    raise AdminError(400, "%s must be a non-negative %s" % (key, conv.__name__))
                if key in ("default_max_records", "max_records_cap", "max_bytes", "gzip_block_rows") and value < 1:
                    raise AdminError(400, "%s must be at least 1 (or null)" % key)
                org.bulk[key] = conv(value)
        for key in ("quote_all", "gzip"):
            if key in payload:
                if not isinstance(payload[key], bool):
                    raise AdminError(400, "%s must be true or false" % key)
                org.bulk[key] = payload[key]
        if "fail_next_job" in payload:
            message = payload["fail_next_job"]
            count = payload.get("fail_count", 1)
            if message is None:
                org.bulk_fail = []
            elif not isinstance(message, str) or not message:
                raise AdminError(400, "fail_next_job must be a non-empty message (or null to cancel)")
            elif isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise AdminError(400, "fail_count must be a positive integer")
            else:
                org.bulk_fail.extend([message] * count)
        for key, attr in (("jobs_max", "bulk_jobs_max"), ("storage_max_mb", "bulk_storage_max")):
            if key in payload:
                value = payload[key]
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise AdminError(400, "%s must be a non-negative integer" % key)
                setattr(org, attr, value)
        now = org.now()
        if "jobs_used" in payload:
            value = payload["jobs_used"]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise AdminError(400, "jobs_used must be a non-negative integer")
            org.bulk_job_times = [now] * value      # as if created now: they age out in 24 h
        if "storage_used_mb" in payload:
            value = payload["storage_used_mb"]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise AdminError(400, "storage_used_mb must be a non-negative integer")
            org.bulk_storage = [(now, value)] if value else []
    return 200, admin_bulk_view(org)


def admin_faults(org, method, payload):
    with org.lock:
        if method == "GET":
            return 200, org.faults
        if method == "DELETE":
            cleared = len(org.faults)
            org.faults = []
            return 200, {"cleared": cleared}
        if method != "POST":
            raise AdminError(405, "faults: GET, POST or DELETE")
        fault = make_fault(org.fault_seq + 1, payload, AdminError)
        org.fault_seq += 1
        org.faults.append(fault)
        return 201, {"id": fault["id"]}


# ----------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------

class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


def parse_args(argv):
    p = argparse.ArgumentParser(description="Fake Salesforce REST API for sync's tests")
    p.add_argument("--port", type=int, default=0, help="0 = pick a free port (printed)")
    p.add_argument("--records", type=int, default=5000, help="live Contacts to seed")
    p.add_argument("--accounts", type=int, default=None, help="Accounts to seed (default records/20, min 10)")
    p.add_argument("--deleted", type=int, default=0, help="extra seeded Contacts already in the recycle bin")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--base-time", default="2025-03-01T00:00:00Z",
                   help="seeded SystemModstamps end before this ISO time ('now' = current hour)")
    p.add_argument("--token-lifetime", type=float, default=7200, help="access token lifetime, seconds")
    p.add_argument("--daily-limit", type=int, default=1000000, help="DailyApiRequests Max")
    p.add_argument("--client-id", default="test-client")
    p.add_argument("--client-secret", default="test-secret")
    p.add_argument("--refresh-token", default="test-refresh")
    p.add_argument("--render-cache", type=int, default=DEFAULT_RENDER_CACHE, metavar="RECORDS",
                   help="records whose JSON the query caches keep, per record and per page (default "
                        "%(default)s; 0 = no caching); a listing read more than once is served from "
                        "them only when it fits")
    p.add_argument("--query-gzip-level", type=int, default=1, choices=range(1, 10), metavar="1-9",
                   help="zlib level of the records of gzipped query pages (default 1; 6 is zlib's default, "
                        "which Java's GZIPOutputStream and Apache use: its output inflates ~1.5x faster)")
    p.add_argument("--state-file", default=None, help="accepted for compatibility; ignored")
    p.add_argument("--verbose", action="store_true", help="log requests to stderr")
    cfg = p.parse_args(argv)
    if cfg.accounts is None:
        cfg.accounts = max(10, cfg.records // 20)
    if cfg.base_time == "now":
        cfg.base_time = None
    else:
        cfg.base_time = parse_iso(cfg.base_time)
        if cfg.base_time is None:
            p.error("--base-time must be ISO-8601 with a zone, or 'now'")
    return cfg


def main(argv=None):
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    org = Org(cfg)
    Handler.org = org
    Handler.verbose = cfg.verbose
    server = Server(("127.0.0.1", cfg.port), Handler)
    port = server.server_address[1]
    org.base_url = "http://127.0.0.1:%d" % port
    print("listening on %d" % port, flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
