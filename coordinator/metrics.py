"""The coordinator's Prometheus metrics (default registry), labelled by configured product.

Products a caller names but the config lacks share the label UNKNOWN_PRODUCT, so a caller
cannot grow the label set without bound.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

UNKNOWN_PRODUCT = "_unknown"

QUEUE_DEPTH = Gauge(
    "im_coordinator_queue_depth", "Messages and events waiting for the webhook", ["product"]
)
ACCEPTED = Counter(
    "im_coordinator_accepted_total",
    "Messages and events queued for the webhook",
    ["product", "kind"],
)
REFUSED = Counter(
    "im_coordinator_refused_total",
    "Messages and events refused at submit, by reason",
    ["product", "kind", "reason"],
)
POSTED = Counter("im_coordinator_posted_total", "Batches the webhook accepted (2xx)", ["product"])
POSTED_ITEMS = Counter(
    "im_coordinator_posted_items_total", "Messages and events the webhook accepted", ["product"]
)
FAILED = Counter(
    "im_coordinator_failed_total",
    "Webhook POSTs that failed, by HTTP status, timeout or connection",
    ["product", "reason"],
)
RETRIED = Counter(
    "im_coordinator_retried_total", "Webhook POSTs repeated after a failure", ["product"]
)
DEAD_LETTERS = Counter(
    "im_coordinator_dead_letters_total", "Batches given up after their attempts", ["product"]
)
DEAD_LETTER_ITEMS = Counter(
    "im_coordinator_dead_letter_items_total", "Messages and events in given-up batches", ["product"]
)
DROPPED_ON_STOP = Counter(
    "im_coordinator_dropped_on_stop_total",
    "Items still queued when the service stopped",
    ["product"],
)
LATENCY = Histogram(
    "im_coordinator_webhook_latency_seconds",
    "One webhook POST, from send to answer or failure",
    ["product"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
