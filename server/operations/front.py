"""The federation's public front: nginx terminating mutual TLS and forwarding only the Fleet API.

Flower 1.41-1.42's SuperLink serves its Fleet, Control and Runtime APIs on one HTTPS port, and the
open-source Control API has no authentication. So the SuperLink listens on 127.0.0.1 only, and
the federation's public address is served by nginx (Debian's package; chosen over a Python proxy
because it is a well-kept TLS terminator with client-certificate checks, CRL reloads without a
restart, exact path allow-lists and an access log, all in configuration):

* a connection must present a client certificate issued by the federation's CA and not on its
  CRL (server/crl.pem); otherwise every request is answered 403 before any Flower code sees it;
* only the Fleet API paths a SuperNode uses are forwarded; Control and Runtime paths, and the
  Fleet API's own node (un)registration, are answered 403;
* /aseanfl/door tells a hospital's daemon whether its certificate is admitted, and why not;
* a Fleet request is forwarded only when the node public key it is signed with (Flower's
  `flwr-public-key` header, checked against the signature by the SuperLink) is the registered
  key of the hospital named in the client certificate: one hospital's certificate cannot carry
  another's node key;
* a request body is capped at what the federation really sends (Flower chunks arrays into 5 MiB
  objects) and buffered here before it is forwarded, so an oversize body is refused (413) before
  the SuperLink parses any of it; forwarded requests and concurrent requests are limited per
  certificate (refusals nginx answers itself, which cost nothing upstream, are not counted).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

from server.operations.provision import Federation

# the Fleet API calls of an authenticated SuperNode (flwr 1.41-1.42); register/unregister are not among them
FLEET_PATHS = ("activate-node", "deactivate-node", "send-node-heartbeat", "pull-messages", "push-messages",
               "get-run", "get-fab", "push-object", "pull-object", "confirm-message-received")
DOOR = "/aseanfl/door"
# The largest Fleet request a SuperNode sends is one push-object of an array chunk (Flower's
# FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE, 5 MiB) plus its protobuf framing; the rest are a few KiB.
MAX_BODY_MIB = 6
# Per hospital certificate: a SuperNode polls at most 5 times a second and sends bursts of object
# pushes and pulls (a resnet18 round: ~30 requests); the limits leave it room and stop a flood.
RATE_PER_S, BURST, CONNECTIONS = 20, 200, 8
_TEMP = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")  # nginx's temp folders, kept in the front's own


def nginx_binary() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).is_file()), None)
    if found is None:
        raise RuntimeError("nginx is not installed; the federation's public front needs it "
                           "(Debian/Ubuntu: apt-get install nginx-light or nginx)")
    return found


def front_dir(fed: Federation) -> Path:
    return fed.server_dir / "front"


def header_key(node_pub: bytes) -> str:
    """A node public key (OpenSSH) as Flower's SuperNode sends it in `flwr-public-key`: base64 of
    its PEM SubjectPublicKeyInfo."""
    import base64

    from cryptography.hazmat.primitives import serialization

    key = serialization.load_ssh_public_key(node_pub)
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(pem).decode("ascii")


def _key_map(fed: Federation) -> str:
    """nginx map: the certificate's subject -> the node key its hospital registered. The key is
    compared byte for byte (`if` with `!=` is case-sensitive); the subjects are lower-case site ids."""
    lines = [f'    "CN={site}" "{header_key(fed.public_key(site).read_bytes())}";' for site in fed.sites()]
    return "\n".join(["  map $ssl_client_s_dn $aseanfl_node_key {", '    default "none";', *lines, "  }"])


def config(fed: Federation) -> str:
    s, d = fed.server_dir, front_dir(fed)
    temp = "\n".join(f"  {kind}_temp_path {d / 'tmp' / kind};" for kind in _TEMP)
    refuse = '"aseanfl front: refused: a hospital client certificate of this federation is required ($ssl_client_verify)\\n"'
    mismatch = ('"aseanfl front: refused: the request is not signed with the node key registered for '
                '$ssl_client_s_dn\\n"')
    return f"""# written by `aseanfl server start`; edits are overwritten
worker_processes 1;
pid {d / 'nginx.pid'};
error_log {d / 'error.log'} warn;
worker_shutdown_timeout 10s;  # a reload (revocation) closes old connections soon
events {{ worker_connections 1024; }}
http {{
  server_tokens off;
  default_type text/plain;
  log_format front '$time_iso8601 $msec $remote_addr "$ssl_client_s_dn" $ssl_client_verify "$request" $status $bytes_sent $request_time';
  access_log {d / 'access.log'} front;
{temp}
  client_max_body_size {MAX_BODY_MIB}m;
  # a body is held whole in memory (never in a temp file: nginx's workers may run as another
  # account, and model updates need not touch this disk), at most the cap per request and
  # CONNECTIONS requests per hospital; nothing reaches the SuperLink before it is whole and within the cap.
  # One MiB above the cap: a chunked body is refused (413) when the chunk that passes the cap is
  # announced; with a buffer the size of the cap, a body that fills it exactly at a chunk's end was
  # spilled to a temp file first (500 where the workers cannot write there)
  client_body_buffer_size {MAX_BODY_MIB + 1}m;
  proxy_request_buffering on;
  proxy_buffering off;
  limit_req_zone $ssl_client_s_dn zone=per_hospital:1m rate={RATE_PER_S}r/s;
  limit_conn_zone $ssl_client_s_dn zone=hospital_conns:1m;
  limit_req_status 429;
  limit_conn_status 429;
{_key_map(fed)}
  upstream superlink {{ server {fed.superlink}; keepalive 16; }}
  server {{
    listen {fed.listen} ssl;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_certificate {s / 'server.crt'};
    ssl_certificate_key {s / 'server.key'};
    ssl_client_certificate {s / 'ca.crt'};
    ssl_crl {s / 'crl.pem'};
    ssl_verify_client optional;
    ssl_verify_depth 1;
    error_page 495 496 =403 @refused;  # nginx's own refusal of a bad or missing certificate, said plainly
    location @refused {{ return 403 {refuse}; }}
    error_page 413 @too_large;
    location @too_large {{ return 413 "aseanfl front: refused: a request body over {MAX_BODY_MIB} MiB\\n"; }}
    error_page 429 @too_many;
    location @too_many {{ return 429 "aseanfl front: refused: too many requests from this certificate\\n"; }}
    location = {DOOR} {{
      if ($ssl_client_verify != SUCCESS) {{ return 403 {refuse}; }}
      return 200 "aseanfl front: admitted $ssl_client_s_dn\\n";
    }}
    location ~ ^/v1/fleet/({'|'.join(FLEET_PATHS)})$ {{
      limit_req zone=per_hospital burst={BURST} nodelay;
      limit_conn hospital_conns {CONNECTIONS};
      if ($ssl_client_verify != SUCCESS) {{ return 403 {refuse}; }}
      if ($http_flwr_public_key != $aseanfl_node_key) {{ return 403 {mismatch}; }}
      proxy_pass https://superlink;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_ssl_trusted_certificate {s / 'ca.crt'};
      proxy_ssl_verify on;
      proxy_ssl_name localhost;
      proxy_ssl_session_reuse on;
      proxy_read_timeout 600s;
      proxy_send_timeout 600s;
    }}
    location / {{ return 403 "aseanfl front: refused: only the Fleet API is served on this address\\n"; }}
  }}
}}
"""


def start(fed: Federation) -> subprocess.Popen:
    """Write the config, check it, start nginx in the foreground (a child of the server)."""
    binary = nginx_binary()
    d = front_dir(fed)
    for kind in _TEMP:
        (d / "tmp" / kind).mkdir(parents=True, exist_ok=True)
    conf = d / "nginx.conf"
    conf.write_text(config(fed))
    base = [binary, "-p", str(d), "-c", str(conf), "-e", str(d / "error.log")]
    check = subprocess.run([*base, "-t", "-q"], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"the front's nginx config is refused: {(check.stderr or check.stdout).strip()[-400:]}")
    return subprocess.Popen([*base, "-g", "daemon off;"], stdin=subprocess.DEVNULL)


def last_error(fed: Federation) -> str:
    """nginx's last complaint (e.g. the public port already in use), for the operator's one line."""
    log = front_dir(fed) / "error.log"
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    # "2026/11/23 18:15:35 [emerg] 5217#5217: bind() to ... failed (98: ...)"; nginx's retries add "still could not"
    said = [line.split(": ", 1)[-1] for line in lines if "[emerg]" in line or "[crit]" in line]
    said = [line for line in said if not line.startswith("still could not")] or said
    return said[-1] if said else ""


def last_seen(fed: Federation, tail: int = 4 << 20) -> dict[str, float]:
    """Hospital (certificate CN) -> when its last request the front admitted arrived (epoch
    seconds), from the end of the access log (its last `tail` bytes)."""
    import re

    log = front_dir(fed) / "access.log"
    try:
        with log.open("rb") as f:
            f.seek(max(0, log.stat().st_size - tail))
            text = f.read().decode(errors="replace")
    except OSError:
        return {}
    seen: dict[str, float] = {}
    for msec, cn in re.findall(r"^\S+ (\d+\.\d+) \S+ \"[^\"]*CN=([^,\"]+)[^\"]*\" SUCCESS \"[^\"]*\" 200 ", text, re.M):
        seen[cn] = float(msec)
    return seen


def reload(fed: Federation, proc: subprocess.Popen) -> None:
    """Write the config again (hospitals and their node keys) and re-read it with the CRL and
    certificates: nginx's graceful reload."""
    (front_dir(fed) / "nginx.conf").write_text(config(fed))
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGHUP)
