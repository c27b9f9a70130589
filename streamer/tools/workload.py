"""The seeded reference workload: a chat application (docs/workload.md).

This module owns the synthetic data that the benchmarks, the demo and the load
tests share: the subscriptions a fleet of gateways registers and the stream of
change events the service sees. Everything is generated from a seed with a
private :class:`random.Random` (no global state), so two runs with the same
seed and size see exactly the same data; :meth:`Workload.subscriptions` and
:meth:`Workload.events` draw from independent streams, and each call starts
its stream afresh.

Sizes scale with N, the number of subscriptions: C = N/10 chats ``c0``…
(the first 1 % are channels), N/5 users ``u0``…, database ``app`` with
collections ``messages``, ``chats`` and ``users``.

Subscriptions (exact shares of N, shuffled, ids ``sub-000123``, spread evenly
over the gateways ``gw-0``…):

- 55 %    ``messages``: ``chat_id == c``
- 10 %    ``users`` or ``chats`` (half each): ``_id == x``
- 10 %    ``messages``: ``chat_id in [3-5 chats]``
- 10 %    ``messages``: ``chat_id == c`` and ``type == "text"``
- 14.95 % CEL (minus the whole-collection ones below), a mix of four shapes
  with varied constants (weights in ``CEL_SHAPES``)
- 0.05 %  ``users``: ``status == "online"`` and ``profile.country == X``
- min(100, N/10 000) whole-collection subscriptions on ``chats``

A chat named by a subscription is drawn by membership: 90 % uniformly among
the ordinary chats, 10 % among the channels. Events pick chats by activity,
Zipf(s = 1.1) over chat rank, so channels carry most of the traffic.

Fan-out is kept realistic (a handful to a few hundred matches per event,
never a large share of N). The broad CEL shapes set the weights in
``CEL_SHAPES``: every subscriber of ``'urgent' in doc.tags`` matches every
message carrying that tag, so the disjunctive shape names one of five rare
"alert" tags (5 % of tag draws) and is 1 % of the CEL share (at N = 1M: ~300
subscribers per alert tag); the ``users`` profile shape is 10 % (a user
update matches ~300 of them at 1M). At N = 1M, seed 1: messages match ~100
at p50 (~430 at p99), users ~330, chats ~105 (mostly the whole-collection
ones).

Events: 80 % ``insert`` into ``messages``, 10 % ``update`` of a recent
message (score, text and/or tags changed; the document is the full
post-image), 3 % soft ``delete`` (the post-image with ``deleted: true``),
7 % ``update`` of a user or a chat (half each; chats by activity, users
uniformly, so ``_id`` subscriptions do match). Documents are JSON-ready dicts
of about 200-400 bytes.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from streamer.matching.matcher import Filter
from streamer.protocol.puller_v1_pb2 import ChangeEvent

__all__ = [
    "CEL_SHAPES",
    "DATABASE",
    "EventSpec",
    "SubscriptionSpec",
    "Workload",
    "change_event",
]

DATABASE = "app"
MESSAGES = "messages"
CHATS = "chats"
USERS = "users"

#: Share of the chats that are channels (the first ids, the busiest).
CHANNEL_FRACTION = 0.01
#: Zipf exponent of chat activity over chat rank.
ZIPF_S = 1.1
#: Share of subscription chat draws that go to channels.
CHANNEL_MEMBERSHIP_SHARE = 0.10

# Subscription kinds.
K_CHAT, K_ID, K_IN, K_TWO, K_CEL, K_DASH, K_WHOLE = range(7)
KIND_NAMES = ("chat_eq", "doc_id", "chat_in", "chat_text", "cel", "dashboard", "whole")

#: CEL shapes and their weights within the CEL share.
CEL_SHAPES: tuple[tuple[str, float], ...] = (
    ("chat_score", 0.45),  # doc.chat_id == 'c12' && doc.score >= 3.5
    ("user_or_tag", 0.01),  # doc.user_id == 'u3' || 'urgent' in doc.tags
    ("chat_prefix", 0.44),  # doc.chat_id == 'c5' && doc.text.startsWith('hello')
    ("profile", 0.10),  # has(doc.profile) && doc.profile.country == 'DE' && doc.age >= 18
)

COMMON_TAGS = (
    "news", "photo", "question", "answer", "meme", "work", "family", "travel",
    "food", "music", "sports", "code", "idea", "todo", "fun",
)  # fmt: skip
ALERT_TAGS = ("urgent", "important", "bug", "outage", "security")
#: The 20-word tag vocabulary of the reference workload.
TAG_VOCABULARY = COMMON_TAGS + ALERT_TAGS
#: Probability that one tag draw is an alert tag (each alert tag: 1 %).
ALERT_TAG_SHARE = 0.05

GREETINGS = ("hello", "hi", "hey", "thanks", "ok", "good morning")
WORDS = (
    "the", "a", "we", "you", "it", "is", "are", "was", "meeting", "today",
    "tomorrow", "deploy", "build", "coffee", "lunch", "see", "later", "sure",
    "maybe", "great", "nice", "photo", "link", "call", "now", "soon", "done",
    "review", "please", "check", "this", "that", "weekend", "plan", "ticket",
    "fixed", "broken", "again", "thanks", "lol", "ok", "and", "or", "but",
)  # fmt: skip
COUNTRIES = (
    "DE", "FR", "US", "GB", "ES", "IT", "NL", "PL", "SE", "NO", "DK", "FI",
    "AT", "CH", "BE", "PT", "IE", "CZ", "JP", "KR", "IN", "BR", "MX", "CA",
    "AU", "NZ", "ZA", "NG", "EG", "TR",
)  # fmt: skip
CITIES = ("Springfield", "Riverside", "Fairview", "Centerville", "Franklin", "Greenville")
FIRST_NAMES = (
    "Ada",
    "Alan",
    "Grace",
    "Linus",
    "Barbara",
    "Ken",
    "Margaret",
    "Dennis",
    "Frances",
    "Edsger",
)
LAST_NAMES = (
    "Lovelace",
    "Turing",
    "Hopper",
    "Torvalds",
    "Liskov",
    "Thompson",
    "Hamilton",
    "Ritchie",
    "Allen",
)
LANGUAGES = ("de", "en", "fr", "es", "it", "ja", "pt")
STATUSES = ("online", "away", "offline")
SCORE_THRESHOLDS = (1, 2, 2.5, 3, 3.5, 4, 4.5)  # ints too: int/double mix in CEL
AGE_THRESHOLDS = (13, 16, 18, 21, 25, 30, 40, 50, 65)

#: Event kinds and cumulative probabilities.
EVENT_MIX = (
    ("insert_message", 0.80),
    ("update_message", 0.10),
    ("delete_message", 0.03),
    ("update_user_or_chat", 0.07),
)

_BASE_TIME_MS = 1_764_000_000_000  # fixed epoch: no wall clock in the data
_RECENT_MESSAGES = 4096  # ring of messages that updates and deletes pick from
_PRE_EXISTING_MESSAGES = 256


@dataclass(frozen=True, slots=True)
class SubscriptionSpec:
    """One subscription as a gateway would register it."""

    id: str
    gateway: str
    database: str
    collection: str
    filters: tuple[Filter, ...]
    expression: str | None


@dataclass(frozen=True, slots=True)
class EventSpec:
    """One change event; ``document`` is the decoded (post-image) document."""

    database: str
    collection: str
    op: str  # 'insert' | 'update' | 'delete'
    document_id: str
    document: dict[str, Any]


def _new_subscription_spec(
    id: str,
    gateway: str,
    database: str,
    collection: str,
    filters: tuple[Filter, ...],
    expression: str | None,
) -> SubscriptionSpec:
    """Build a SubscriptionSpec without the frozen ``__init__``'s overhead.

    Same object as ``SubscriptionSpec(...)`` (the slots are set through their
    descriptors, as the frozen ``__init__`` does via ``object.__setattr__``),
    cheaper, which matters when generating millions of them.
    """
    obj = _new(SubscriptionSpec)
    _set_id(obj, id)
    _set_gateway(obj, gateway)
    _set_database(obj, database)
    _set_collection(obj, collection)
    _set_filters(obj, filters)
    _set_expression(obj, expression)
    return obj


_new = object.__new__
_set_id, _set_gateway, _set_database, _set_collection, _set_filters, _set_expression = (
    SubscriptionSpec.__dict__[name].__set__
    for name in ("id", "gateway", "database", "collection", "filters", "expression")
)


class Workload:
    """The reference chat workload for ``n_subscriptions`` subscriptions."""

    def __init__(self, n_subscriptions: int, *, seed: int = 1, gateways: int = 8) -> None:
        if n_subscriptions < 1:
            raise ValueError("n_subscriptions must be >= 1")
        if gateways < 1:
            raise ValueError("gateways must be >= 1")
        self.n = n_subscriptions
        self.seed = seed
        self.gateways = gateways
        self.n_chats = max(2, n_subscriptions // 10)
        self.n_channels = max(1, int(self.n_chats * CHANNEL_FRACTION))
        self.n_ordinary = self.n_chats - self.n_channels
        self.n_users = max(1, n_subscriptions // 5)
        self._zipf_cum: list[float] | None = None

    # ------------------------------------------------------------------ shares
    def kind_counts(self) -> dict[str, int]:
        """Exact number of subscriptions of each kind (sums to N)."""
        n = self.n
        counts = {
            "chat_eq": n * 55 // 100,
            "doc_id": n // 10,
            "chat_in": n // 10,
            "chat_text": n // 10,
            "dashboard": n * 5 // 10_000,
            "whole": min(100, n // 10_000),
        }
        counts["cel"] = n - sum(counts.values())
        return {name: counts[name] for name in KIND_NAMES}

    # ----------------------------------------------------------- subscriptions
    def subscriptions(self) -> Iterator[SubscriptionSpec]:
        """Yield the N subscriptions, deterministically from the seed."""
        rng = random.Random(f"streamer-workload/subscriptions/{self.seed}")
        rand = rng.random
        counts = self.kind_counts()
        kinds = bytearray()
        for code, name in enumerate(KIND_NAMES):
            kinds += bytes((code,)) * counts[name]
        rng.shuffle(kinds)  # exact shares, interleaved

        n_ch, n_ord, n_users = self.n_channels, self.n_ordinary, self.n_users
        ch_share = CHANNEL_MEMBERSHIP_SHARE
        ord_scale = 1.0 / (1.0 - ch_share)

        def chat() -> str:  # by membership
            r = rand()
            if r < ch_share or n_ord == 0:
                return f"c{int(r / ch_share * n_ch) % n_ch}"
            return f"c{n_ch + int((r - ch_share) * ord_scale * n_ord)}"

        gws = [f"gw-{g}" for g in range(self.gateways)]
        n_gw = self.gateways
        cel_cum = list(itertools.accumulate(w for _, w in CEL_SHAPES))
        cel_total = cel_cum[-1]
        n_shapes = len(CEL_SHAPES) - 1
        width = max(6, len(str(self.n - 1)))
        spec = _new_subscription_spec
        db = DATABASE
        type_text = Filter("type", "==", "text")
        online = Filter("status", "==", "online")

        fmt = f"sub-{{:0{width}d}}".format
        for i, k in enumerate(kinds):
            sid = fmt(i)
            gw = gws[i % n_gw]
            if k == K_CHAT:  # the common case, with chat() inlined
                r = rand()
                if r < ch_share or n_ord == 0:
                    c = f"c{int(r / ch_share * n_ch) % n_ch}"
                else:
                    c = f"c{n_ch + int((r - ch_share) * ord_scale * n_ord)}"
                yield spec(sid, gw, db, MESSAGES, (Filter("chat_id", "==", c),), None)
            elif k == K_ID:
                if rand() < 0.5:
                    yield spec(
                        sid,
                        gw,
                        db,
                        USERS,
                        (Filter("_id", "==", f"u{int(rand() * n_users)}"),),
                        None,
                    )
                else:
                    yield spec(sid, gw, db, CHATS, (Filter("_id", "==", chat()),), None)
            elif k == K_IN:
                want = 3 + int(rand() * 3)
                picked: list[str | int | float | bool] = []
                for _ in range(64):
                    c = chat()
                    if c not in picked:
                        picked.append(c)
                        if len(picked) == want:
                            break
                yield spec(sid, gw, db, MESSAGES, (Filter("chat_id", "in", picked),), None)
            elif k == K_TWO:
                yield spec(
                    sid, gw, db, MESSAGES,
                    (Filter("chat_id", "==", chat()), type_text),
                    None,
                )  # fmt: skip
            elif k == K_CEL:
                shape = min(bisect.bisect_right(cel_cum, rand() * cel_total), n_shapes)
                if shape == 0:
                    thr = SCORE_THRESHOLDS[int(rand() * len(SCORE_THRESHOLDS))]
                    expr = f"doc.chat_id == '{chat()}' && doc.score >= {thr}"
                    coll = MESSAGES
                elif shape == 1:
                    tag = ALERT_TAGS[int(rand() * len(ALERT_TAGS))]
                    expr = f"doc.user_id == 'u{int(rand() * n_users)}' || '{tag}' in doc.tags"
                    coll = MESSAGES
                elif shape == 2:
                    prefix = GREETINGS[int(rand() * len(GREETINGS))]
                    expr = f"doc.chat_id == '{chat()}' && doc.text.startsWith('{prefix}')"
                    coll = MESSAGES
                else:
                    country = COUNTRIES[int(rand() * len(COUNTRIES))]
                    age = AGE_THRESHOLDS[int(rand() * len(AGE_THRESHOLDS))]
                    expr = (
                        f"has(doc.profile) && doc.profile.country == '{country}'"
                        f" && doc.age >= {age}"
                    )
                    coll = USERS
                yield spec(sid, gw, db, coll, (), expr)
            elif k == K_DASH:
                country = COUNTRIES[int(rand() * len(COUNTRIES))]
                yield spec(
                    sid, gw, db, USERS,
                    (online, Filter("profile.country", "==", country)),
                    None,
                )  # fmt: skip
            else:  # K_WHOLE
                yield spec(sid, gw, db, CHATS, (), None)

    # ------------------------------------------------------------------ events
    def _zipf_table(self) -> list[float]:
        if self._zipf_cum is None:
            s = ZIPF_S
            self._zipf_cum = list(itertools.accumulate((r + 1) ** -s for r in range(self.n_chats)))
        return self._zipf_cum

    def events(self, count: int) -> Iterator[EventSpec]:
        """Yield ``count`` change events from the seeded event stream.

        The stream is independent of :meth:`subscriptions`; each call restarts
        it, so ``events(k)`` is a prefix of ``events(k + j)``.
        """
        rng = random.Random(f"streamer-workload/events/{self.seed}")
        rand = rng.random
        cum = self._zipf_table()
        total = cum[-1]
        last_chat = self.n_chats - 1
        bisect_right = bisect.bisect_right
        n_users, n_channels = self.n_users, self.n_channels
        vocab_common, vocab_alert = COMMON_TAGS, ALERT_TAGS

        def active_chat() -> str:  # by activity (Zipf over rank)
            return f"c{min(bisect_right(cum, rand() * total), last_chat)}"

        def text() -> str:
            length = 5 + int(rand() * 196)  # 5..200 chars
            parts = [GREETINGS[int(rand() * len(GREETINGS))]] if rand() < 0.3 else []
            size = sum(len(p) + 1 for p in parts)
            while size <= length:  # joined length = size - 1
                w = WORDS[int(rand() * len(WORDS))]
                parts.append(w)
                size += len(w) + 1
            out = " ".join(parts)[:length]
            return out[:-1] + "." if out.endswith(" ") else out  # exactly `length` chars

        def tags() -> list[str]:
            out: list[str] = []
            for _ in range(int(rand() * 4)):  # 0..3 tags
                if rand() < ALERT_TAG_SHARE:
                    t = vocab_alert[int(rand() * len(vocab_alert))]
                else:
                    t = vocab_common[int(rand() * len(vocab_common))]
                if t not in out:
                    out.append(t)
            return out

        def msg_type() -> str:
            r = rand()
            return "text" if r < 0.80 else ("image" if r < 0.95 else "system")

        seq = itertools.count()

        def new_message() -> dict[str, Any]:
            n = next(seq)
            return {
                "_id": f"m-{n:08d}",
                "chat_id": active_chat(),
                "user_id": f"u{int(rand() * n_users)}",
                "type": msg_type(),
                "text": text(),
                "score": round(rand() * 5.0, 3),
                "created_at": _BASE_TIME_MS + n * 250 + int(rand() * 250),
                "tags": tags(),
                "reply_to": f"m-{int(rand() * n):08d}" if n and rand() < 0.15 else None,
                "deleted": False,
            }

        n_first, n_last = len(FIRST_NAMES), len(LAST_NAMES)

        def user_doc(uid: int, t: int) -> dict[str, Any]:
            doc: dict[str, Any] = {
                "_id": f"u{uid}",
                "name": f"{FIRST_NAMES[uid % n_first]} {LAST_NAMES[(uid // 7) % n_last]}",
                "status": STATUSES[int(rand() * len(STATUSES))],
                "age": 13 + int(rand() * 68),
                "created_at": _BASE_TIME_MS - 86_400_000 * (1 + uid % 900),
                "last_seen": t,
            }
            if rand() < 0.9:
                bio_len = 20 + int(rand() * 100)
                doc["profile"] = {
                    "country": COUNTRIES[int(rand() * len(COUNTRIES))],
                    "city": CITIES[int(rand() * len(CITIES))],
                    "language": LANGUAGES[int(rand() * len(LANGUAGES))],
                    "bio": " ".join(WORDS[int(rand() * len(WORDS))] for _ in range(bio_len // 4))[
                        :bio_len
                    ],
                }
            else:
                doc["bio"] = "(no profile yet) " + " ".join(
                    WORDS[int(rand() * len(WORDS))] for _ in range(12)
                )
            return doc

        def chat_doc(cid: str, t: int) -> dict[str, Any]:
            n_members = 4 + int(rand() * 12)
            return {
                "_id": cid,
                "kind": "channel" if int(cid[1:]) < n_channels else "group",
                "title": " ".join(
                    WORDS[int(rand() * len(WORDS))] for _ in range(2 + int(rand() * 4))
                ).title(),
                "members": [f"u{int(rand() * n_users)}" for _ in range(n_members)],
                "archived": rand() < 0.05,
                "created_at": _BASE_TIME_MS - 3_600_000 * (1 + int(rand() * 10_000)),
                "updated_at": t,
            }

        recent: list[dict[str, Any]] = [new_message() for _ in range(_PRE_EXISTING_MESSAGES)]
        ring_pos = 0
        p_insert, p_update, p_delete = 0.80, 0.90, 0.93
        for i in range(count):
            t = _BASE_TIME_MS + (_PRE_EXISTING_MESSAGES + i) * 250
            r = rand()
            if r < p_insert:
                doc = new_message()
                if len(recent) < _RECENT_MESSAGES:
                    recent.append(doc)
                else:
                    recent[ring_pos] = doc
                    ring_pos = (ring_pos + 1) % _RECENT_MESSAGES
                yield EventSpec(DATABASE, MESSAGES, "insert", doc["_id"], doc)
            elif r < p_delete:
                j = int(rand() * len(recent))
                doc = dict(recent[j])
                if r < p_update:
                    what = 1 + int(rand() * 7)  # bitmask over score/text/tags, never empty
                    if what & 1:
                        doc["score"] = round(rand() * 5.0, 3)
                    if what & 2:
                        doc["text"] = text()
                    if what & 4:
                        doc["tags"] = tags()
                    op = "update"
                else:
                    doc["deleted"] = True
                    op = "delete"
                recent[j] = doc
                yield EventSpec(DATABASE, MESSAGES, op, doc["_id"], doc)
            elif rand() < 0.5:
                uid = int(rand() * n_users)
                yield EventSpec(DATABASE, USERS, "update", f"u{uid}", user_doc(uid, t))
            else:
                cid = active_chat()
                yield EventSpec(DATABASE, CHATS, "update", cid, chat_doc(cid, t))


def change_event(spec: EventSpec, index: int, *, timestamp: int = 0) -> ChangeEvent:
    """The ``puller.v1`` form of a workload event, as a Puller would send it.

    A soft delete is an ``update`` whose post-image says ``deleted: true``
    (the event transformation turns it into a DELETE); ``index`` names the event.
    """
    return ChangeEvent(
        event_id=f"ev-{index}",
        database=spec.database,
        mgo_coll=spec.collection,
        mgo_doc_id=spec.document_id,
        op_type="insert" if spec.op == "insert" else "update",
        full_doc=orjson.dumps(spec.document),
        timestamp=timestamp,
    )
