"""Fault injection shared by the fake APIs (test/fake_*.py): what POST /__admin/faults accepts,
which request a fault hits, how it changes an answer, and how a broken answer is delivered.

A fake's request handler mixes in FaultDelivery and defines fault_owner() (the object holding
`lock` and `faults`); its send() takes (status, body, ctype, headers), or it overrides send_whole().
"""
import base64
import json
import re
import select
import socket
import struct
import time

FAULT_HELP = (
    "body {path_regex, count?=1, skip?=0, delay?, status?, body?, body_b64?, headers?, content_type?, "
    "drop?, reset?, truncate?, stall?, corrupt?, corrupt_field?, huge_bytes?} -> 201 {id}. "
    "path_regex is searched in path?query; count = requests that get the fault, after `skip` matching "
    "requests passed untouched. delay: seconds to wait first (alone: then answer normally). "
    "reset: close with a TCP RST before answering. drop: close (FIN) before answering. "
    "status [+ body (JSON value or string) | body_b64 (raw bytes, base64; status then defaults to 200)] "
    "[+ headers, content_type]: that answer instead of the real one. Without status/body_b64, "
    "truncate/stall/corrupt act on the REAL answer (built as usual, never gzipped). "
    "corrupt: 'malformed' (body cut at 2/3, Content-Length of the cut body: a complete response with bad "
    "JSON; works on any body), 'wrong_types' (in every record of the page - items of records/data/results, "
    "their properties/fields object if any, else the top-level object - every value except "
    "id/Id/attributes/object/hs_object_id changes type: string -> number (its length), number -> "
    "{'value': n}, boolean -> [b], object -> its JSON text, array -> number (its length), null stays; "
    "the envelope (paging keys) is untouched), 'huge_value' (field corrupt_field, default the first "
    "string field not named above and not date-like, of the FIRST record becomes a string of huge_bytes "
    "bytes, default 5 MiB); wrong_types/huge_value send an answer without records (or not JSON) "
    "unchanged and stay armed for the next request (not counted as a hit). "
    "truncate: Content-Length of the whole body, first half sent, connection closed. "
    "stall: seconds; Content-Length of the whole body, first half sent, then nothing until `stall` "
    "seconds passed or the client hung up, then the connection is closed.")

FAULT_CORRUPT_MODES = ("malformed", "wrong_types", "huge_value")
FAULT_KEEP_KEYS = frozenset(("id", "Id", "attributes", "object", "hs_object_id"))
FAULT_DATE_RE = re.compile(r"^\d{4}-\d\d-\d\d")
FAULT_HUGE_DEFAULT = 5 * 1024 * 1024


def make_fault(seq, payload, error):
    """A fault from a POST /__admin/faults body; raises error(400, message) when it is not valid."""
    if not isinstance(payload, dict):
        raise error(400, "a fault is a JSON object")
    regex = payload.get("path_regex")
    if not regex or not isinstance(regex, str):
        raise error(400, "path_regex is required")
    try:
        re.compile(regex)
    except re.error as e:
        raise error(400, "bad path_regex: %s" % e)
    body_b64 = payload.get("body_b64")
    if body_b64 is not None:
        try:
            base64.b64decode(body_b64, validate=True)
        except (TypeError, ValueError):
            raise error(400, "body_b64 must be a base64 string")
    stall = payload.get("stall")
    if stall is not None and (isinstance(stall, bool) or not isinstance(stall, (int, float)) or stall <= 0):
        raise error(400, "stall must be a number of seconds > 0")
    corrupt = payload.get("corrupt")
    if corrupt is not None and corrupt not in FAULT_CORRUPT_MODES:
        raise error(400, "corrupt must be one of %s" % ", ".join(FAULT_CORRUPT_MODES))
    huge = payload.get("huge_bytes", FAULT_HUGE_DEFAULT)
    if isinstance(huge, bool) or not isinstance(huge, int) or not 0 < huge <= 256 * 1024 * 1024:
        raise error(400, "huge_bytes must be an integer in 1..268435456")
    field = payload.get("corrupt_field")
    if field is not None and not isinstance(field, str):
        raise error(400, "corrupt_field must be a string")
    try:
        count, skip = int(payload.get("count", 1)), int(payload.get("skip", 0))
    except (TypeError, ValueError):
        raise error(400, "count and skip must be integers")
    if skip < 0:
        raise error(400, "skip must be >= 0")
    if not (payload.get("status") or payload.get("drop") or payload.get("delay") or body_b64 is not None
            or payload.get("reset") or payload.get("truncate") or stall or corrupt):
        raise error(400, "a fault needs status, body_b64, drop, reset, delay, truncate, stall or corrupt")
    return {"id": seq, "path_regex": regex, "status": payload.get("status"), "remaining": count,
            "hits": 0, "skip": skip, "delay": payload.get("delay"), "drop": bool(payload.get("drop")),
            "reset": bool(payload.get("reset")), "truncate": bool(payload.get("truncate")),
            "stall": stall, "corrupt": corrupt, "corrupt_field": field, "huge_bytes": huge,
            "headers": payload.get("headers"), "content_type": payload.get("content_type"),
            "body": payload.get("body"), "body_b64": body_b64}


def fault_pick(faults, target):
    """The fault the request `target` (path?query) gets, or None; counts hits (caller holds the lock)."""
    for fault in faults:
        if fault["remaining"] > 0 and re.search(fault["path_regex"], target):
            if fault.get("skip", 0) > 0:
                fault["skip"] -= 1
                return None             # let through untouched (not offered to later faults)
            fault["remaining"] -= 1
            fault["hits"] += 1
            return dict(fault)
    return None


def fault_on_real_answer(fault):
    """True when the fault changes the answer the fake builds (no status/body_b64 of its own)."""
    return not (fault.get("status") or fault.get("body_b64") is not None or fault.get("drop")
                or fault.get("reset")) and bool(fault.get("truncate") or fault.get("stall")
                                                or fault.get("corrupt"))


def fault_holders(doc):
    """The objects whose values a corrupt fault changes: per record, its properties/fields object
    (HubSpot, Airtable) or the record itself; a document without a record list is one record."""
    def holder(rec):
        for key in ("properties", "fields"):
            if isinstance(rec.get(key), dict):
                return rec[key]
        return rec
    if isinstance(doc, dict):
        for key in ("records", "data", "results"):
            if isinstance(doc.get(key), list):
                return [holder(x) for x in doc[key] if isinstance(x, dict)]
        return [holder(doc)]
    if isinstance(doc, list):
        return [holder(x) for x in doc if isinstance(x, dict)]
    return []


def fault_wrong_type(value):
    if isinstance(value, bool):
        return [value]
    if isinstance(value, (int, float)):
        return {"value": value}
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, list):
        return len(value)
    return value


def fault_corrupt(fault, payload):
    """The body as a corrupt fault makes it: (bytes, applied). wrong_types and huge_value leave a
    body without records (or no JSON) alone: applied False (the caller gives the fault back)."""
    mode = fault.get("corrupt")
    if not mode:
        return payload, True
    if mode == "malformed":
        return payload[:len(payload) * 2 // 3], True
    try:
        doc = json.loads(payload)
    except ValueError:
        return payload, False
    holders = fault_holders(doc)
    if not holders:
        return payload, False
    if mode == "wrong_types":
        for h in holders:
            for k in list(h):
                if k not in FAULT_KEEP_KEYS:
                    h[k] = fault_wrong_type(h[k])
    elif holders:
        h = holders[0]
        field = fault.get("corrupt_field")
        if field is None:
            names = [k for k in h if k not in FAULT_KEEP_KEYS]
            strings = [k for k in names if isinstance(h[k], str) and not FAULT_DATE_RE.match(h[k])]
            field = (strings or names or ["huge_value"])[0]
        n = int(fault.get("huge_bytes") or FAULT_HUGE_DEFAULT)
        h[field] = ("0123456789abcdef" * (n // 16 + 1))[:n]
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode(), True


def fault_give_back(faults, fault_id):
    """Undo one hit of a fault (caller holds the lock): it stays armed for the next request."""
    for fault in faults:
        if fault["id"] == fault_id:
            fault["remaining"] += 1
            fault["hits"] -= 1


class FaultDelivery:
    """Request-handler methods that deliver a fault: an RST, a cut or a stalled answer."""

    def fault_owner(self):
        """The object whose `lock` guards its `faults` list."""
        raise NotImplementedError

    def send_whole(self, status, payload, ctype, headers):
        self.send(status, payload, ctype, headers)


    def reset_connection(self):
        """Hang up with a TCP RST (SO_LINGER on, timeout 0) without answering."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        try:
            self.rfile.close()          # the socket's makefile holds a reference: drop it first,
            self.connection.close()     # so this really closes the descriptor: RST, no FIN
        except OSError:
            pass

    def send_faulted(self, fault, status, payload, ctype, headers):
        """Send `payload` (the fault's own answer or the real one) as the fault says: corrupted,
        and/or cut after half the body (truncate: closed at once; stall: closed later)."""
        payload, applied = fault_corrupt(fault, bytes(payload))
        if not applied:
            # wrong_types/huge_value found no record to change: stay armed for the next request
            owner = self.fault_owner()
            with owner.lock:
                fault_give_back(owner.faults, fault["id"])
            if not (fault.get("truncate") or fault.get("stall")):
                self.send_whole(status, payload, ctype, headers)
                return
        cut = bool(fault.get("truncate") or fault.get("stall"))
        self.fault_log(status)
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            for k, v in (headers or {}).items():
                if v is not None and k.lower() not in ("content-length", "content-encoding",
                                                       "content-type", "_identity"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload[:len(payload) // 2] if cut else payload)
            self.wfile.flush()
        except OSError:
            self.close_connection = True
            return
        if cut:
            self.close_connection = True
            self.stall_until = time.time() + float(fault.get("stall") or 0)

    def finish_fault(self):
        """After a cut answer: wait out a stall (or until the client hangs up), then close."""
        until, self.stall_until = getattr(self, "stall_until", None), None
        if until is None:
            return
        conn = self.connection
        while True:
            left = until - time.time()
            if left <= 0:
                break
            try:
                ready, _, _ = select.select([conn], [], [], min(left, 0.25))
                if ready and not conn.recv(65536):
                    break               # the client hung up
            except OSError:
                break
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
