"""What the dashboard reads, without Streamlit: runs under a root folder, their metrics and SAEs,
feature-store filters, text run live through a model and an SAE, a prompt continued with and
without steering (`playground.py`), and tokens as highlighted HTML.

The Streamlit app (`dashboards/app.py`) is a thin layer over these; a notebook can call them too.
"""
