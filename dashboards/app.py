"""The saelab dashboard: browse runs and features, and run text live through a model and its SAEs.

    saelab dashboard [--runs DIR] [--port 8501]          (or: streamlit run dashboards/app.py)

It reads what the pipeline wrote under the runs folder (`$SAELAB_RUNS`, default `runs/`) and never
recomputes training. The pages are in `views/`; what they compute is in `saelab.browse`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the pages import ui.py from here
    sys.path.insert(0, str(HERE))

import ui  # noqa: E402

st.set_page_config(page_title="saelab", page_icon=":material/biotech:", layout="wide")
navigation = st.navigation(
    [
        st.Page("views/runs.py", title="Runs", icon=":material/monitoring:", default=True),
        st.Page("views/features.py", title="Feature browser", icon=":material/search:"),
        st.Page("views/feature.py", title="Feature page", icon=":material/extension:"),
        st.Page("views/steering.py", title="Steering playground", icon=":material/tune:"),
        st.Page("views/circuit.py", title="Circuit", icon=":material/account_tree:"),
    ]
)
ui.sidebar()
navigation.run()
