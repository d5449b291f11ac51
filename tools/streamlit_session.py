"""A dashboard session without a browser: Streamlit's websocket protocol, spoken directly.

A browser tab is one Streamlit session. It opens `/_stcore/stream`, asks for a script run
(`BackMsg.rerun_script`: the page, the URL's query string, the widgets the user changed) and
receives the page as `ForwardMsg`s, up to `script_finished`. `Session` does the same, so a test or a
benchmark can open many real sessions on one real server (`tools/screenshots.py`'s `dashboard()`),
time each page from the request to its last element, and read what it shows. The browser's own
drawing is not included; the server's work, the protocol and the wire are.

Like a browser, a session sends the value of every widget on its page with each request (the ones
the server set, or the user changed), not only the ones that changed: Streamlit resets a widget
whose value a request leaves out.
"""

from __future__ import annotations

import time
import urllib.parse
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
from streamlit.proto.WidgetStates_pb2 import WidgetState
from websockets.sync.client import ClientConnection, connect

# The widget kinds a session keeps values for, and the WidgetState field each value travels in.
VALUE_FIELDS = {
    "selectbox": "string_value",
    "text_area": "string_value",
    "text_input": "string_value",
    "checkbox": "bool_value",
    "number_input": None,  # int_value or double_value, by its data_type
}
# How each kind of element carries its text.
TEXT_FIELDS = {"heading": "body", "markdown": "body", "alert": "body", "code": "code_text", "html": "body"}


@dataclass
class Page:
    """One script run as the session received it."""

    seconds: float  # from sending the request to `script_finished`
    elements: list[tuple[str, Any]] = field(default_factory=list)  # (kind, its proto), in the order sent

    def of_kind(self, kind: str) -> list[Any]:
        return [proto for each, proto in self.elements if each == kind]

    def texts(self, kind: str) -> list[str]:
        return [getattr(proto, TEXT_FIELDS[kind]) for proto in self.of_kind(kind)]

    @property
    def exceptions(self) -> list[str]:
        """The messages of uncaught exceptions and `st.error`s the page shows."""
        errors = [alert.body for alert in self.of_kind("alert") if alert.format == alert.ERROR]
        return [exception.message for exception in self.of_kind("exception")] + errors

    def kind_of(self, widget_id: str) -> str:
        return next(kind for kind, proto in self.elements if getattr(proto, "id", None) == widget_id)

    def widget(self, label: str, kind: str | None = None) -> Any:
        """The first widget labelled `label` (of element `kind`, when given): its proto (`id`, `default`, …)."""
        found = [
            proto
            for each, proto in self.elements
            if getattr(proto, "label", None) == label and proto.id and kind in (None, each)
        ]
        if not found:
            raise KeyError(f"no {kind or 'widget'} labelled {label!r} on the page")
        return found[0]


class Session:
    """One browser tab's session on the dashboard at `base_url` (`http://host:port`)."""

    def __init__(self, base_url: str, timeout: float = 120) -> None:
        self.timeout = timeout
        stream = base_url.replace("http", "ws", 1) + "/_stcore/stream"
        self._closing = ExitStack()
        self.socket: ClientConnection = self._closing.enter_context(
            connect(stream, subprotocols=["streamlit"], max_size=2**28, open_timeout=30)
        )
        self.page_name, self.query_string = "", ""
        self.last: Page | None = None
        self.values: dict[str, WidgetState] = {}  # widget id → its value, as the browser would hold it

    def open(self, page: str, **query: object) -> Page:
        """Go to `page` (its URL path: `feature`, `steering`…) with the URL query `query`, as a link does."""
        self.page_name = page
        self.query_string = urllib.parse.urlencode({key: value for key, value in query.items() if value is not None})
        return self._run([])

    def interact(self, values: dict[str, Any] | None = None, press: str | None = None) -> Page:
        """Set the widgets labelled as `values`' keys and press the button (or form submit) labelled `press`."""
        states = dict(self.values)
        for label, value in (values or {}).items():
            widget = self.last.widget(label)
            state = WidgetState(id=widget.id)
            setattr(state, _value_field(self.last.kind_of(widget.id), widget, value), value)
            states[widget.id] = state
        if press is not None:
            button = self.last.widget(press, "button")
            states[button.id] = WidgetState(id=button.id, trigger_value=True)
        return self._run(list(states.values()))

    def _remember_values(self, page: Page) -> None:
        """The values of the page's widgets: the server's where it set one or the widget is new, else ours."""
        values = {}
        for kind, proto in page.elements:
            if kind not in VALUE_FIELDS or not proto.id:
                continue
            if proto.id in self.values and not proto.set_value:
                values[proto.id] = self.values[proto.id]
                continue
            value = _shown_value(kind, proto)
            if value is not None:
                state = WidgetState(id=proto.id)
                setattr(state, _value_field(kind, proto, value), value)
                values[proto.id] = state
        self.values = values

    def _run(self, states: list[WidgetState]) -> Page:
        message = BackMsg()
        message.rerun_script.page_name = self.page_name
        message.rerun_script.query_string = self.query_string
        message.rerun_script.widget_states.widgets.extend(states)
        start = time.perf_counter()
        self.socket.send(message.SerializeToString())
        page = Page(0.0)
        while True:
            received = ForwardMsg()
            received.ParseFromString(self.socket.recv(timeout=self.timeout))
            kind = received.WhichOneof("type")
            if kind == "delta" and received.delta.WhichOneof("type") == "new_element":
                element = received.delta.new_element
                page.elements.append((element.WhichOneof("type"), getattr(element, element.WhichOneof("type"))))
            elif kind == "page_info_changed":  # the app wrote the URL (st.query_params)
                self.query_string = received.page_info_changed.query_string
            elif kind == "script_finished":
                if received.script_finished == ForwardMsg.FINISHED_EARLY_FOR_RERUN:  # st.rerun: a new run follows
                    page.elements.clear()
                    continue
                page.seconds = time.perf_counter() - start
                self.last = page
                self._remember_values(page)
                return page

    def close(self) -> None:
        self._closing.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shown_value(kind: str, proto: Any) -> Any:
    """The value a widget shows: the one the server set, else its default (None: a selectbox with nothing chosen)."""
    if kind == "selectbox":
        if proto.set_value:
            return proto.raw_value
        return proto.options[proto.default] if 0 <= proto.default < len(proto.options) else None
    if kind == "number_input":
        value = proto.value if proto.set_value else proto.default
        return int(value) if proto.data_type == proto.INT else float(value)
    return proto.value if proto.set_value else proto.default


def _value_field(kind: str, proto: Any, value: Any) -> str:
    """The WidgetState field that carries `value` for a widget of `kind`."""
    if kind == "number_input":
        return "int_value" if proto.data_type == proto.INT else "double_value"
    return VALUE_FIELDS.get(kind) or "string_value"
