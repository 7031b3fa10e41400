"""Reading a running vigil's /metrics, for the broker benchmarks' inline scripts."""
import re
import urllib.request


def metrics(port):
    """The exposition text, or None while the server does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return r.read().decode()
    except OSError:
        return None


def value(text, name):
    """An unlabelled sample's value, 0 when absent (or no text)."""
    m = re.search(rf"^{re.escape(name)} (\S+)$", text or "", re.M)
    return float(m.group(1)) if m else 0.0
