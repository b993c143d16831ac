"""`thinktime ui`: a Gradio chat that shows the thinking as it happens, and works offline.

The thinking streams into a collapsible panel (a chat message with a title and a pending status),
the answer below it; multi-chain strategies show their candidates and votes beside the chat. It runs
on the same core as the server and the CLI: `Thinker.stream` for events, `ReasoningStream` for where
the answer starts.

Offline: Gradio's telemetry and version check are turned off before it is imported, the default
theme's fonts are served locally, there is no share link and no server-side rendering (node), and
the page loads nothing from another host (the browser test checks every request).
"""
from __future__ import annotations

import copy
import os
import threading
from collections.abc import Iterator
from typing import Any

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no telemetry, no version check (both call home)

import gradio as gr  # noqa: E402  (after the line above)

from thinktime.api import Thinker  # noqa: E402
from thinktime.server.streaming import CandidateView, ReasoningStream, reply_split  # noqa: E402
from thinktime.strategies import SCALE_OPTION, STRATEGIES  # noqa: E402

LANGS = ("auto", "en", "zh")
# No single "$" delimiter: "I had $5, then $10" is money, not math (models write inline math as \( \) or $$ too).
LATEX = [{"left": "$$", "right": "$$", "display": True}, {"left": "\\[", "right": "\\]", "display": True},
         {"left": "\\(", "right": "\\)", "display": False}]
CSS = "#answer-box {min-height: 2em} footer {display: none !important}"
# What the N slider sets: each strategy's size (SCALE_OPTION), except those counted in tokens (budget forcing, allocation).
N_OPTION = {strategy: option for strategy, option in SCALE_OPTION.items() if strategy not in ("budget", "allocation")}


class ChatSession:
    """What one browser tab's request does; independent of Gradio so it can be tested directly."""

    def __init__(self, thinker: Thinker):
        self.thinker = thinker
        spec = getattr(thinker.engine, "spec", None)
        self.think_tags = bool(spec and spec.think_tags)

    def respond(self, question: str, chat: list[dict], history: list[dict], strategy: str = "cot", n: int = 4,
                budget: float | None = None, lang: str = "auto", max_new_tokens: int | None = None,
                temperature: float = 0.0, cancel: threading.Event | None = None
                ) -> Iterator[tuple[list[dict], list[dict], str]]:
        """Yields (chat messages, thinker history, candidates markdown) as the answer grows."""
        question = (question or "").strip()
        if not question:
            yield chat, history, ""
            return
        thinker = self.thinker
        if lang != thinker.lang:
            thinker = copy.copy(thinker)
            thinker.lang = lang
        chat = chat + [{"role": "user", "content": question},
                       {"role": "assistant", "content": "",
                        "metadata": {"title": "Thinking…", "status": "pending"}}]
        turn = _Turn(chat, strategy, self.think_tags)
        options = {N_OPTION[strategy]: int(n)} if strategy in N_OPTION else {}
        yield chat, history, turn.board
        stream = thinker.stream(question, history=history, strategy=strategy, options=options,
                                budget_tokens=int(budget) if budget else None, cancel=cancel,
                                max_new_tokens=int(max_new_tokens) if max_new_tokens else None,
                                temperature=float(temperature))
        try:
            for event in stream:
                if turn.take(event):
                    yield chat, history, turn.board
        except Exception as exc:  # shown in the chat; the UI keeps going
            turn.thinking["metadata"] = {"title": "Stopped by an error", "status": "done"}
            chat.append({"role": "assistant", "content": f"⚠️ {type(exc).__name__}: {exc}"})
            yield chat, history, turn.board
            return
        if turn.result is None:  # stopped
            turn.thinking["metadata"] = {"title": "Thinking (stopped)", "status": "done"}
            yield chat, history, turn.board
            return
        content = turn.finish(cancel)
        history = history + [{"role": "user", "content": question},
                             {"role": "assistant", "content": content or turn.result.text[-2000:]}]
        yield chat, history, turn.board


class _Turn:
    """One answer as it grows: the thinking panel (the chat's last message), the answer below it, the board."""

    def __init__(self, chat: list[dict], strategy: str, think_tags: bool):
        self.chat, self.thinking = chat, chat[-1]
        self.strategy, self.think_tags = strategy, think_tags
        self.answer: dict[str, Any] | None = None
        self.splitter = ReasoningStream(think_tags)
        self.view = CandidateView()
        self.board = ""
        self.result = None

    def answer_message(self) -> dict[str, Any]:
        if self.answer is None:
            self.answer = {"role": "assistant", "content": ""}
            self.chat.append(self.answer)
        return self.answer

    def take(self, event) -> bool:
        """Folds one event into the panel, the answer and the board; False when it changes nothing shown."""
        strategy, view = self.strategy, self.view
        if event.kind == "delta":
            if strategy == "cot":
                reasoning, content = self.splitter.feed(event.text)
            else:
                reasoning, content = view.delta(event.index, event.text), ""
            self.thinking["content"] += reasoning
            if content:
                self.answer_message()["content"] += content
        elif event.kind == "candidate_finished" and strategy != "cot":
            self.thinking["content"] += view.finish(event.index, event.data)
            self.board = _board_progress(event, self.board)
        elif event.kind == "progress":
            self.board = _progress(event.data) or self.board
            if strategy != "cot":
                self.thinking["content"] += view.progress(event.data)
        elif event.kind == "result":
            self.result = event.result
        else:
            return False
        return True

    def finish(self, cancel: threading.Event | None) -> str:
        """The panel closed with its time and tokens, the answer written out; returns the answer's text."""
        result = self.result
        reasoning, content = reply_split(result.text, result.finish_reason, self.think_tags)
        if self.strategy == "cot":
            self.thinking["content"] = reasoning  # the closing statement moves below the panel, as the answer
        else:
            self.thinking["content"] += self.view.flush(result)
        tokens = result.usage.completion_tokens
        stopped = result.finish_reason == "cancelled" or (cancel is not None and cancel.is_set())
        self.thinking["metadata"] = {"title": f"{'Stopped after' if stopped else 'Thought for'} "
                                              f"{result.seconds:.1f} s · {tokens} tokens", "status": "done"}
        self.answer_message()["content"] = _answer_text(result, content, stopped)
        self.board = _board(result) or self.board
        return content


def _answer_text(result, content: str, stopped: bool = False) -> str:
    lines = [content] if content else []
    if result.answer is not None:
        how = "checked: \\boxed{}" if result.answer_method == "boxed" else f"fallback: {result.answer_method}"
        lines.append(f"**Answer:** `{result.answer}` ({how})")
    elif not content:
        lines.append("_(stopped before an answer)_" if stopped else
                     "_(no answer: the chain was cut by the token limit)_" if result.finish_reason == "length"
                     else "_(the model gave no answer)_")
    return "\n\n".join(lines)


def _progress(data: dict) -> str:
    votes = data.get("votes") if isinstance(data, dict) else None
    if isinstance(votes, dict):
        votes = [{"answer": a, "votes": v} for a, v in votes.items()]
    if not isinstance(votes, list) or not votes:
        return ""
    rows = "\n".join(f"| `{v.get('answer')}` | {v.get('votes')} |" for v in votes if isinstance(v, dict))
    done = f" ({data['samples']} of {data['n']} chains)" if "samples" in data and "n" in data else ""
    return f"**Votes so far{done}**\n\n| answer | votes |\n|---|---|\n" + rows


def _board_progress(event, board: str) -> str:
    answer = event.data.get("answer") if isinstance(event.data, dict) else None
    line = f"- candidate {event.index + 1}: `{answer}`"
    return (board + "\n" if board else "**Candidates**\n\n") + line


def _board(result) -> str:
    if len(result.candidates) <= 1:
        return ""
    rows = []
    for i, c in enumerate(result.candidates):
        chosen = " ✔" if c.answer == result.answer and c.answer is not None else ""
        votes = "" if c.votes is None else c.votes
        score = "" if c.score is None else f"{c.score:.3f}"
        answer = "—" if c.answer is None else f"`{c.answer}`"
        rows.append(f"| {i + 1} | {answer}{chosen} | {votes} | {score} | {c.usage.completion_tokens} |")
    return (f"**{result.strategy}: {len(result.candidates)} candidates** — answer `{result.answer}`\n\n"
            "| # | answer | votes | score | tokens |\n|---|---|---|---|---|\n" + "\n".join(rows))


class _Turns:
    """The running turn of each browser session, and what Send, Stop and Clear do to it."""

    def __init__(self, session: ChatSession):
        self.session = session
        self.cancels: dict[str, threading.Event] = {}

    def respond(self, question, chat, history, strategy, n, budget, lang, max_new_tokens, temperature,
                request: gr.Request):
        cancels = self.cancels
        key = getattr(request, "session_hash", None) or "default"
        cancel = cancels.get(key)  # reserved when the question was sent (see reserve)
        if cancel is None or cancel.is_set():
            if cancel is not None:  # Stop came while this turn waited in the queue: it does not run
                del cancels[key]
                yield chat, history, gr.update(), gr.update()
                return
            cancel = cancels[key] = threading.Event()
        cleared = False
        try:
            for chat_out, history_out, board in self.session.respond(question, chat or [], history or [], strategy,
                                                                     n, budget, lang, max_new_tokens, temperature,
                                                                     cancel):
                # The box is emptied once, as the question is taken; later updates leave what is typed meanwhile.
                yield chat_out, history_out, board, gr.update() if cleared else ""
                cleared = True
        finally:
            cancel.set()
            if cancels.get(key) is cancel:
                del cancels[key]  # one entry per running turn, not per browser session ever seen

    def reserve(self, request: gr.Request):
        """Runs at once when a question is sent, before its turn waits in the queue, so that Stop can also
        stop a turn that has not started."""
        self.cancels.setdefault(getattr(request, "session_hash", None) or "default", threading.Event())

    def stop(self, request: gr.Request):
        """Stops the engine; the turn then ends as usual, its panel titled "Stopped after ..."."""
        event = self.cancels.get(getattr(request, "session_hash", None) or "default")
        if event is not None:
            event.set()

    def clear_all(self, request: gr.Request):
        self.stop(request)
        return [], [], "", ""


def build(thinker: Thinker) -> gr.Blocks:
    turns = _Turns(ChatSession(thinker))
    strategies = list(STRATEGIES)

    with gr.Blocks(title="thinktime", analytics_enabled=False, fill_height=True) as demo:
        gr.Markdown(f"### thinktime · `{thinker.model_name}` · the thinking streams in the panel, "
                    f"the answer below it")
        history = gr.State([])
        with gr.Row():
            with gr.Column(scale=4):
                chatbot = gr.Chatbot(label="conversation", height=560, latex_delimiters=LATEX, elem_id="chat",
                                     buttons=["copy"], feedback_options=None)
                with gr.Row():
                    question = gr.Textbox(placeholder="Ask a question (math works best), Enter to send",
                                          show_label=False, scale=6, elem_id="question", autofocus=True)
                    send = gr.Button("Send", variant="primary", scale=1, min_width=70, elem_id="send")
                    stop_btn = gr.Button("Stop", scale=1, min_width=70, elem_id="stop")
                    clear = gr.Button("Clear", scale=1, min_width=70, elem_id="clear")
            with gr.Column(scale=2):
                strategy = gr.Dropdown(strategies, value=thinker.strategy if thinker.strategy in strategies
                                       else strategies[0], label="strategy", elem_id="strategy")
                n = gr.Slider(1, 32, value=4, step=1, label="N: chains (self-consistency, best-of-n), beam width, "
                              "mcts iterations, reflect rounds")
                budget = gr.Number(value=0, precision=0, minimum=0, label="budget (total new tokens, 0 = none)")
                lang = gr.Radio(list(LANGS), value=thinker.lang, label="thinking prompt language")
                max_new = gr.Slider(16, max(thinker.max_new_tokens, 64), value=thinker.max_new_tokens, step=16,
                                    label="max new tokens per chain")
                temperature = gr.Slider(0.0, 1.5, value=thinker.temperature, step=0.05, label="temperature")
                board = gr.Markdown("", elem_id="candidates")
        inputs = [question, chatbot, history, strategy, n, budget, lang, max_new, temperature]
        outputs = [chatbot, history, board, question]
        # One event for Enter and Send: while a turn runs, another is not taken (trigger_mode "once"), so no turn
        # starts from a conversation that is still being written.
        gr.on([question.submit, send.click], turns.reserve, None, None, queue=False)
        turn = gr.on([question.submit, send.click], turns.respond, inputs, outputs, trigger_mode="once")
        # Stop runs beside the turn (not queued behind it) and only stops the engine: the turn then finishes
        # its panel. Clear and the chat's own trash icon also cancel the turn, so it cannot write the old
        # conversation back, and empty the model's history with the screen.
        stop_btn.click(turns.stop, None, None, queue=False)
        for trigger in (clear.click, chatbot.clear):
            trigger(turns.clear_all, None, [chatbot, history, board, question], cancels=[turn], queue=False)
    demo.queue(default_concurrency_limit=1)  # one engine: requests take turns
    return demo


def launch(thinker: Thinker, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    demo = build(thinker)
    demo.launch(server_name=host, server_port=port, share=False, ssr_mode=False, show_error=True, quiet=True,
                prevent_thread_lock=not block, css=CSS, footer_links=[], mcp_server=False, pwa=False,
                enable_monitoring=False)
    return demo
