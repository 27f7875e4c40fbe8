"""Fault injection shared by the fake APIs (test/fake_*.py): what POST /__admin/faults accepts,
which request a fault hits, how it changes an answer, and how a broken answer is delivered.

A fake's request handler mixes in FaultDelivery and defines fault_owner() (the object holding
`lock` and `faults`); its send() takes (status, body, ctype, headers), or it overrides send_whole().
"""
import base64
import collections
import heapq
import json
import re
import select
import socket
import struct
import threading
import time
import traceback

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


# ----------------------------------------------------------------------------
# Webhook deliveries (shared by fake_stripe, fake_hubspot, fake_airtable)
# ----------------------------------------------------------------------------

WEBHOOK_RETRY_DELAYS = (0.2, 0.5, 1.0)     # test-friendly; the real APIs retry over hours or days
WEBHOOK_TIMEOUT = 2.0                      # seconds per attempt (connect + answer)
WEBHOOK_LOG_MAX = 5000

WEBHOOK_ADMIN_HELP = {
    "GET /__admin/webhooks":
        "-> {held, pending, timeout, retry_delays}: pending = deliveries queued, waiting for a retry, being "
        "sent or still being batched (0 = nothing more will arrive). Also GET /__admin/webhooks/status "
        "(the only spelling in fake_airtable, whose GET /__admin/webhooks lists its webhooks)",
    "POST /__admin/webhooks/hold":
        "body {hold: true|false} -> {held}. While held, every delivery (of a change made while held, or a "
        "retry falling due while held) is dropped: never sent, logged with status 'dropped', not retried",
    "POST /__admin/webhooks/config":
        "body {timeout?: s, retry_delays?: [s, ...]} -> same as GET /__admin/webhooks. Defaults: timeout 2 s, "
        "retry_delays [0.2, 0.5, 1.0] (a delivery is tried 1 + len(retry_delays) times; a non-2xx answer, "
        "a refused connection or a timeout is a failure)",
    "GET /__admin/webhook_deliveries":
        "-> [{..ids.., url, attempt (1 = first try), status (HTTP status | 'error: ...' | 'dropped'), "
        "t (unix seconds, wall clock), duration_ms}] newest first",
    "DELETE /__admin/webhook_deliveries": "-> {cleared: N}",
}


def webhook_post(url, body, headers, timeout):
    """POST body to url (http only: the receivers are local). (status, response bytes); raises OSError
    (or http.client.HTTPException) on a connection failure or timeout. Redirects are not followed (a 3xx
    is a failed delivery, as with the real senders)."""
    import http.client
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise OSError("unsupported URL %r" % url)
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname, parts.port, timeout=timeout)
    try:
        target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        conn.request("POST", target, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read(65536)
    finally:
        conn.close()


class WebhookSender:
    """Delivers webhooks from one background thread, never from the request that made the change.

    submit(build, ids, on_result) queues a delivery: build(attempt) -> (url, body bytes, headers), or
    None to withdraw it (logged 'cancelled'), is called for every attempt (attempt 1 = first try; signatures and timestamps are made per attempt),
    ids (a dict, e.g. {"event_id": ...}) goes into every log entry, on_result(attempt, status, ok, final)
    is called after each attempt. A failed attempt is retried after retry_delays[attempt - 1] seconds;
    other deliveries go on meanwhile (so a retried delivery can arrive after later ones, as with the real
    APIs). Deliveries are sent one at a time, in the order they fall due."""

    def __init__(self, name):
        self.name = name
        self.cond = threading.Condition()
        self.heap, self.seq = [], 0
        self.log = collections.deque(maxlen=WEBHOOK_LOG_MAX)
        self.held = False
        self.timeout = WEBHOOK_TIMEOUT
        self.delays = list(WEBHOOK_RETRY_DELAYS)
        self.in_flight = 0
        self.batching = 0               # owners' debounce buffers holding events (see pending())
        self.thread = threading.Thread(target=self.run, name=name + "-webhooks", daemon=True)
        self.thread.start()

    # -- control ---------------------------------------------------------------

    def reset(self):
        with self.cond:
            self.heap = []
            self.held = False
            self.log.clear()
            self.timeout, self.delays = WEBHOOK_TIMEOUT, list(WEBHOOK_RETRY_DELAYS)

    def status(self):
        with self.cond:
            return {"held": self.held, "pending": len(self.heap) + self.in_flight + self.batching,
                    "timeout": self.timeout, "retry_delays": list(self.delays)}

    def record(self, ids, url, attempt, status, duration=0.0):
        entry = dict(ids)
        entry.update({"url": url, "attempt": attempt, "status": status, "t": time.time(),
                      "duration_ms": int(duration * 1000)})
        with self.cond:
            self.log.appendleft(entry)
        return entry

    def deliveries(self):
        with self.cond:
            return list(self.log)

    # -- queueing ----------------------------------------------------------------

    def submit(self, build, ids, on_result=None, url=None, delay=0.0, retry=None):
        """Queue a delivery; when held it is logged as dropped instead (returns False).
        retry(status) -> False stops retrying after that answer (default: retry every failure)."""
        with self.cond:
            if self.held:
                held = True
            else:
                held = False
                self.seq += 1
                heapq.heappush(self.heap, (time.monotonic() + delay, self.seq,
                                           {"build": build, "ids": ids, "on_result": on_result,
                                            "attempt": 1, "url": url, "retry": retry}))
                self.cond.notify()
        if held:
            self.record(ids, url, 1, "dropped")
            if on_result:
                on_result(1, "dropped", False, True)
            return False
        return True

    def run(self):
        while True:
            with self.cond:
                while True:
                    now = time.monotonic()
                    if self.heap and self.heap[0][0] <= now:
                        _, _, job = heapq.heappop(self.heap)
                        break
                    self.cond.wait(None if not self.heap else self.heap[0][0] - now)
                held = self.held
                self.in_flight += 1
                timeout, delays = self.timeout, list(self.delays)
            try:
                self.attempt(job, held, timeout, delays)
            except Exception:
                traceback.print_exc()
            finally:
                with self.cond:
                    self.in_flight -= 1

    def attempt(self, job, held, timeout, delays):
        attempt = job["attempt"]
        if held:
            self.record(job["ids"], job["url"], attempt, "dropped")
            if job["on_result"]:
                job["on_result"](attempt, "dropped", False, True)
            return
        built = job["build"](attempt)
        if built is None:               # the owner withdrew it (e.g. its endpoint was deleted)
            self.record(job["ids"], job["url"], attempt, "cancelled")
            if job["on_result"]:
                job["on_result"](attempt, "cancelled", False, True)
            return
        url, body, headers = built
        started = time.monotonic()
        try:
            status, _ = webhook_post(url, body, headers, timeout)
        except Exception as e:         # refused, reset, timeout, bad URL
            status = "error: %s" % (str(e) or type(e).__name__)
        ok = isinstance(status, int) and 200 <= status < 300
        final = ok or attempt > len(delays) or (job.get("retry") is not None and not job["retry"](status))
        self.record(job["ids"], url, attempt, status, time.monotonic() - started)
        if job["on_result"]:
            job["on_result"](attempt, status, ok, final)
        if not final:
            with self.cond:
                self.seq += 1
                heapq.heappush(self.heap, (time.monotonic() + delays[attempt - 1], self.seq,
                                           dict(job, attempt=attempt + 1, url=url)))
                self.cond.notify()

    def send_now(self, url, body, headers, ids):
        """One crafted delivery, synchronously, not retried: (status, response text); logged too."""
        started = time.monotonic()
        try:
            status, resp = webhook_post(url, body, headers, max(self.timeout, 5.0))
            text = resp.decode("utf-8", "replace")
        except Exception as e:
            status, text = "error: %s" % (str(e) or type(e).__name__), None
        self.record(dict(ids, crafted=True), url, 1, status, time.monotonic() - started)
        return status, text


class Debouncer:
    """Collects items for `window` seconds after the first one, then hands the batch to flush(items)
    on a timer thread (HubSpot batches events, Airtable pings once per burst). Counted in the
    sender's pending() while it holds items."""

    def __init__(self, sender, window, flush, max_items=None):
        self.sender, self.window, self.flush, self.max_items = sender, window, flush, max_items
        self.lock = threading.Lock()
        self.items = []
        self.timer = None

    def add(self, item):
        with self.lock:
            self.items.append(item)
            if len(self.items) == 1:
                with self.sender.cond:
                    self.sender.batching += 1
                self.timer = threading.Timer(self.window, self.fire)
                self.timer.daemon = True
                self.timer.start()
            full = self.max_items is not None and len(self.items) >= self.max_items
        if full:
            self.fire()

    def fire(self):
        with self.lock:
            items, self.items = self.items, []
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
        if not items:
            return
        try:
            self.flush(items)
        except Exception:
            traceback.print_exc()
        finally:
            with self.sender.cond:
                self.sender.batching -= 1

    def discard(self):
        with self.lock:
            items, self.items = self.items, []
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
        if items:
            with self.sender.cond:
                self.sender.batching -= 1


def webhook_admin(sender, method, parts, payload, error):
    """The shared /__admin/webhooks* and /__admin/webhook_deliveries endpoints: (status, result), or None
    when `parts` (the path after /__admin/, split) is not one of them. error(status, message) -> exception."""
    head = parts[0] if parts else ""
    if head == "webhook_deliveries" and len(parts) == 1:
        if method == "GET":
            return 200, sender.deliveries()
        if method == "DELETE":
            with sender.cond:
                n = len(sender.log)
                sender.log.clear()
            return 200, {"cleared": n}
        raise error(405, "webhook_deliveries: GET or DELETE")
    if head != "webhooks":
        return None
    if (len(parts) == 1 or parts[1:] == ["status"]) and method == "GET":
        return 200, sender.status()
    if parts[1:] == ["hold"] and method == "POST":
        if not isinstance(payload, dict) or not isinstance(payload.get("hold"), bool):
            raise error(400, "body {hold: true|false}")
        with sender.cond:
            sender.held = payload["hold"]
        return 200, {"held": payload["hold"]}
    if parts[1:] == ["config"] and method == "POST":
        if not isinstance(payload, dict):
            raise error(400, "body {timeout?, retry_delays?}")
        timeout, delays = payload.get("timeout"), payload.get("retry_delays")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not 0 < timeout <= 60):
            raise error(400, "timeout must be a number of seconds in (0, 60]")
        if delays is not None and (not isinstance(delays, list) or len(delays) > 20 or any(
                isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 600 for d in delays)):
            raise error(400, "retry_delays must be a list of at most 20 numbers of seconds in [0, 600]")
        with sender.cond:
            if timeout is not None:
                sender.timeout = float(timeout)
            if delays is not None:
                sender.delays = [float(d) for d in delays]
        return 200, sender.status()
    return None


class WebhookReceiver:
    """A local endpoint for the fakes' self-tests: records every request (method, path, headers,
    body, t) and answers each with the next status of `script` (then `default`)."""

    def __init__(self, default=200):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        receiver = self
        self.requests, self.script, self.default = [], collections.deque(), default
        self.cond = threading.Condition()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver.cond:
                    status = receiver.script.popleft() if receiver.script else receiver.default
                    receiver.requests.append({"method": "POST", "path": self.path, "headers": dict(self.headers),
                                              "body": body, "t": time.time(), "status": status})
                    receiver.cond.notify_all()
                if status == "hang":
                    time.sleep(3)
                    status = 200
                answer = b'{"received":true}'
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                except OSError:         # the sender gave up waiting (a "hang" answer)
                    self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = "http://127.0.0.1:%d/hook" % self.port
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def wait(self, n, timeout=5.0):
        """The first n requests once they arrived (AssertionError after timeout)."""
        deadline = time.time() + timeout
        with self.cond:
            while len(self.requests) < n:
                left = deadline - time.time()
                if left <= 0:
                    raise AssertionError("waited %.1f s for %d webhook request(s), got %d"
                                         % (timeout, n, len(self.requests)))
                self.cond.wait(left)
            return list(self.requests[:n])

    def clear(self):
        with self.cond:
            self.requests = []
            self.script.clear()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
