#!/usr/bin/env python3
"""Probe listener used to write FINDINGS.md: logs every request as one JSON line and answers with the
status in STATUS_FILE (default 200). Usage: listener.py PORT LOGFILE [STATUS_FILE]"""
import json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT, LOG = int(sys.argv[1]), sys.argv[2]
STATUS_FILE = sys.argv[3] if len(sys.argv) > 3 else None


class Handler(BaseHTTPRequestHandler):
    def handle_one(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n).decode("utf-8", "replace") if n else ""
        status = 200
        if STATUS_FILE:
            try:
                status = int(open(STATUS_FILE).read().strip() or 200)
            except (OSError, ValueError):
                pass
        with open(LOG, "a") as f:
            f.write(json.dumps({"t": round(time.time(), 3), "method": self.command, "path": self.path,
                                "headers": dict(self.headers.items()), "body": body, "answered": status}) + "\n")
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = handle_one

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
