"""The one lock every live pass through the dashboard's model holds.

One model serves every browser tab, each in its own thread, and a pass adds hooks to the model for
its duration (the SAE's hook for live text, the interventions for steering), so passes take turns.
It lives here, not in the UI, so that a library function can hold it itself.
"""

from __future__ import annotations

import threading

MODEL_LOCK = threading.Lock()
