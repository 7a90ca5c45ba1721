"""A claiming process for the concurrency tests: scan new/, claim, read, ack, record.

Usage: claim_worker.py QUEUE OUTFILE ORDER. Prints ``ready``, waits for a line on stdin
(so all workers start together), then drains the queue, writing each key it claimed to
OUTFILE, one a line. ORDER ``fwd`` or ``rev`` sets the scan order of each batch, so that
workers collide both head-on and from opposite ends.
"""

from __future__ import annotations

import sys

from maildefer.queue.maildir import MaildirQueue


def main() -> int:
    path, outfile, order = sys.argv[1:4]
    q = MaildirQueue(path)
    print("ready", flush=True)
    sys.stdin.readline()
    claimed = lost = 0
    with open(outfile, "w") as out:
        while True:
            seen = 0
            for batch in q.scan_new(batch=256):
                seen += len(batch)
                for filename in reversed(batch) if order == "rev" else batch:
                    claim = q.claim_sync(filename)
                    if claim is None:
                        lost += 1
                        continue
                    assert claim.message.raw.startswith(b"Subject: m")
                    q.ack_sync(claim)
                    out.write(claim.key + "\n")
                    claimed += 1
            if not seen:
                break
    print(f"claimed {claimed} lost {lost}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
