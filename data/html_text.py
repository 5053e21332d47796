"""HTML → main text with the standard library alone: ``html_to_text(html)``.

The WARC reader (data/source_warc.py) turns each crawled HTML page into a document with it; it is
a pure function of the page, usable on its own. The design follows what trafilatura and
resiliparse do, in a few small rules rather than their scoring models:

1. Parse (``html.parser``) into a light tree, ``_TreeBuilder``. Never text: script, style,
   noscript, template, svg, math, iframe, object, canvas, select, textarea, head and title (the
   title is not body text). Broken markup is repaired as browsers do where it matters for text:
   a new block closes an open ``<p>``, a new ``<li>``/``<td>``/``<tr>``/``<dt>``/``<dd>`` closes
   the open one, a stray end tag is ignored, and unclosed tags end with the page. Nesting past
   ``MAX_DEPTH`` elements (Chrome stops at 512) is flattened, so no page can exhaust the stack.
   Only the first ``MAX_HTML_CHARS`` (2M) characters are parsed: a page's text is near its top,
   Common Crawl cuts payloads at 1 MiB anyway, and the pure-Python parser is slow (measured on
   120 rustdoc/npm pages, 27 KB each: ~4 MB/s of HTML, 7 ms a page, on one core). Plain start
   and end tags are tokenized inline (``_TreeBuilder.goahead``), with the same events as
   html.parser's, ~2x faster end to end (bench/warc_extract.py).
2. Boilerplate: ``<nav>`` and ``<aside>`` (and ``<header>``/``<footer>`` outside an article or
   ``<main>``, where they hold the headline and byline) are dropped, and so are ARIA landmarks of
   the same roles. ``<form>`` and elements whose class or id says nav/menu/footer/sidebar/cookie/
   comment/share/related/ad/... (``_BOILER_WORDS``), or that are hidden (the ``hidden``
   attribute, ``aria-hidden``, ``display:none``) are dropped unless they hold half of the text or
   more: ASP.NET pages wrap the whole page in a ``<form>``, and ``<body class="has-sidebar">`` or
   ``<div id="page" class="with-sidebar">`` must not take the page with them.
3. Main content: one ``<article>`` that holds a quarter of the page's text and twice as much as
   any other article, else ``<main>`` (or ``role=main``) if it holds a quarter, else the body.
4. Link density: a block (div, p, list, table, ...) with two links or more whose text is at
   least half anchor text is a menu, a tag cloud or a list of related links, and is dropped
   unless it holds half of the text (a page that is a list of links stays one).
5. Render: block elements are lines, ``<br>`` breaks a line, list items get "- " (or "1. " in
   an ordered list) and two spaces of indent per level of nesting, table cells are separated by
   a tab, ``<pre>`` keeps its whitespace, elsewhere whitespace runs (no-break spaces too) are
   one space. Entities are decoded by the parser. Empty lines are dropped: paragraphs are
   separated by one newline, as in Common Crawl's WET text.
"""

from __future__ import annotations

import re
import zlib
from html import parser as _stdlib_parser
from html import unescape
from html.parser import HTMLParser

MAX_HTML_CHARS = 2_000_000  # characters of a page parsed; the rest is not read
MAX_DEPTH = 200  # open elements kept nested; deeper start tags are flattened into their parent
SUBSTANTIAL = 0.25  # share of the page's text an <article>/<main> needs to be taken as the page
LINK_DENSITY = 0.5  # share of anchor text from which a block of >= 2 links is a menu
GUARD = 0.5  # a marked or link-dense block holding this share of the text or more is kept

# Never text (their content is code, markup or form state), dropped with everything inside.
_NEVER_TEXT = frozenset(
    "script style noscript template svg math iframe object canvas select textarea head title"
    .split()
)  # fmt: skip
_VOID = frozenset("area base br col embed hr img input link meta param source track wbr".split())
_BLOCK = frozenset(
    "address article aside blockquote body caption center dd details dialog dir div dl dt "
    "fieldset figcaption figure footer form h1 h2 h3 h4 h5 h6 header hgroup hr html legend li "
    "main menu nav ol p pre section summary table tbody tfoot thead tr ul".split()
)
_LISTS = frozenset(("ul", "ol", "menu", "dir"))
# Blocks that the link-density rule judges (not headings or list items: a linked title or a list
# item that is a link is content; a list of them is judged whole)
_LINK_CHECKED = frozenset(
    "div section p ul ol dl menu dir table tbody td th center blockquote".split()
)
# Start tags that close an open element of the listed tags, looking no further down the stack
# than the boundary tags (the HTML parsing algorithm's implied end tags, as far as text needs)
_P_CLOSERS = _BLOCK - {"body", "html", "caption", "tbody", "tfoot", "thead", "tr", "legend"}
_BUTTON_SCOPE = frozenset(("html", "table", "td", "th", "caption", "button", "template"))
_IMPLIED = {
    "li": ({"li"}, frozenset(("ul", "ol", "menu", "dir", "table", "html"))),
    "dt": ({"dt", "dd"}, frozenset(("dl", "table", "html"))),
    "dd": ({"dt", "dd"}, frozenset(("dl", "table", "html"))),
    "tr": ({"tr"}, frozenset(("table", "html"))),  # (and the cell open in it)
    "td": ({"td", "th"}, frozenset(("tr", "table", "html"))),
    "th": ({"td", "th"}, frozenset(("tr", "table", "html"))),
}
_HEAD_CONTENT = frozenset("base link meta noscript script style template title".split())

# Page-level landmarks, by tag or ARIA role: always boilerplate (header/footer only outside an
# article or <main>)
_SEMANTIC = frozenset(("nav", "aside"))
_PAGE_LEVEL = frozenset(("header", "footer"))
_SEMANTIC_ROLES = frozenset(("navigation", "complementary", "search", "menu", "menubar"))
_PAGE_ROLES = frozenset(("banner", "contentinfo"))
# Words of a class or id that mark boilerplate, as the first or last word of the name
# ("site-footer", "nav-menu", "comments-area", "cookie-notice", "share-buttons", "ad-slot"):
# navigation, footers, sidebars, cookie/consent banners, reader comments (trafilatura leaves them
# out by default too), share buttons, related-article teasers, sign-up boxes, ads.
_BOILER_WORDS = frozenset(
    "nav navbar navigation menu breadcrumb breadcrumbs footer sidebar cookie cookies consent "
    "comment comments share sharing social related newsletter subscribe ad ads advert "
    "advertisement sponsored popup".split()
)
# A first word that makes the name a state, not the element's role ("has-sidebar", "no-ads")
_MODIFIERS = frozenset("has with without no not is show hide enable disable".split())
_STRUCTURAL = frozenset(("html", "body", "main", "article"))  # never marked by class or id
_NAME_WORD = re.compile(r"[a-z0-9]+")
_HIDDEN_STYLE = re.compile(r"display\s*:\s*none|visibility\s*:\s*hidden", re.IGNORECASE)
_CELL = re.compile(r" ?\x00[\x00 ]*")  # cell separators (and the spaces around them) → one tab

# The tokenizer's fast path (``_TreeBuilder.goahead``): start tags of the plain, common form
# (ASCII names, attributes separated by ASCII whitespace, values quoted, or bare and followed by
# whitespace or ">") are matched by one regex; html.parser's methods parse any other markup. On
# whatever ``_FAST_START`` matches, html.parser's own regexes read the same tag and attributes
# (its tag name ends where this one does, each attribute is one ``attrfind_tolerant`` match; a
# bare value with a "/" is left to it, as it reads <a href=x/> as href="x/", not as "/>"), so
# the parser's events, and the text, are the same; html.parser's loop and tag parsing were ~45%
# of the extraction's time. (tests/data/test_html_text_fast.py compares the events on tag soup.)
_FAST_ATTR = re.compile(
    r"([a-zA-Z_:][-a-zA-Z0-9_:.]*)"
    r"(?:[ \t\n\r\f]*=[ \t\n\r\f]*(\"[^\"]*\"|'[^']*'|[^\s\"'=<>`/]+(?=[ \t\n\r\f]|\Z)))?"
)
_FAST_START = re.compile(
    r"<([a-zA-Z][-a-zA-Z0-9]*)((?:[ \t\n\r\f]+[a-zA-Z_:][-a-zA-Z0-9_:.]*"
    r"(?:[ \t\n\r\f]*=[ \t\n\r\f]*(?:\"[^\"]*\"|'[^']*'|[^\s\"'=<>`/]+(?=[ \t\n\r\f>])))?)*)"
    r"[ \t\n\r\f]*(/?)>"
)
_AMP_END = re.compile(r"[\s;]")


def _stdlib_fingerprint() -> int:
    """A checksum of the html.parser code that ``_TreeBuilder.goahead`` stands in for: the fast
    loop is used only under the html.parser it was written against (3.11's; later releases change
    how comments, script and tags are tokenized)."""
    P = _stdlib_parser.HTMLParser
    fns = (P.goahead, P.parse_starttag, P.check_for_whole_start_tag, P.parse_endtag,
           P.set_cdata_mode, P.clear_cdata_mode)  # fmt: skip
    parts = [f.__code__.co_code for f in fns] + [repr(P.CDATA_CONTENT_ELEMENTS).encode()]
    for name in ("tagfind_tolerant", "attrfind_tolerant", "locatestarttagend_tolerant",
                 "endtagfind", "starttagopen"):  # fmt: skip
        parts.append(getattr(_stdlib_parser, name, re.compile("")).pattern.encode())
    return zlib.crc32(b"\0".join(parts))


_FAST_LOOP = _stdlib_fingerprint() == 2622475741  # (CPython 3.11.7's)


class _Node:
    """An element: its tag, children (nodes and text), what marks it as boilerplate
    (``SEMANTIC``: always dropped; ``GUARDED``: dropped unless it holds much of the text) and,
    once measured, its text's characters (not whitespace), anchor-text characters and links."""

    __slots__ = ("tag", "kids", "mark", "kind", "chars", "link_chars", "links")

    def __init__(self, tag: str, mark: int = 0, kind: str = ""):
        self.tag, self.kids, self.mark, self.kind = tag, [], mark, kind
        self.chars = self.link_chars = self.links = 0


SEMANTIC, GUARDED = 1, 2
# What an element is to the builder's counters (``_Node.kind``): never text, a link (<a href>),
# <main> or role=main, an <article>, a <pre>
NEVER, LINK, MAIN, ARTICLE, PRE = "never", "link", "main", "article", "pre"


def _marked_name(value: str) -> bool:
    """Whether a class or id attribute names boilerplate (``_BOILER_WORDS``)."""
    hit = _NAMES_SEEN.get(value)
    if hit is None:
        if len(_NAMES_SEEN) >= 100_000:  # (a bound on what a long run holds)
            _NAMES_SEEN.clear()
        hit = _NAMES_SEEN[value] = _names_boilerplate(value)
    return hit


_NAMES_SEEN: dict[str, bool] = {}  # class/id values seen: a page repeats a few hundred of them


def _names_boilerplate(value: str) -> bool:
    for token in value.lower().split():
        words = _NAME_WORD.findall(token)
        if (
            words
            and words[0] not in _MODIFIERS
            and (words[0] in _BOILER_WORDS or words[-1] in _BOILER_WORDS)
        ):
            return True
    return False


def _mark(tag: str, attrs: dict, in_content: bool) -> int:
    """How a start tag marks its element as boilerplate: 0, ``SEMANTIC`` or ``GUARDED``."""
    if not attrs:  # (most tags: what the tag alone says)
        if tag in _SEMANTIC or (not in_content and tag in _PAGE_LEVEL):
            return SEMANTIC
        return GUARDED if tag == "form" else 0
    role = (attrs.get("role") or "").strip().lower()
    if tag in _SEMANTIC or role in _SEMANTIC_ROLES:
        return SEMANTIC
    if not in_content and (tag in _PAGE_LEVEL or role in _PAGE_ROLES):
        return SEMANTIC
    if tag == "form" or "hidden" in attrs or (attrs.get("aria-hidden") or "").lower() == "true":
        return GUARDED
    if (style := attrs.get("style")) and _HIDDEN_STYLE.search(style):
        return GUARDED
    if tag not in _STRUCTURAL:
        for key in ("class", "id"):
            if (value := attrs.get(key)) and _marked_name(value):
                return GUARDED
    return 0


def _kind(tag: str, attrs: dict) -> str:
    """What an element is to the builder (``_Node.kind``): NEVER, LINK, MAIN, ARTICLE, PRE or ""."""
    if tag in _NEVER_TEXT:
        return NEVER
    if tag == "a":
        return LINK if attrs.get("href") is not None else ""  # (<a name=...>: an anchor)
    if tag == "main" or (attrs.get("role") or "").strip().lower() == "main":
        return MAIN
    if tag == "article":
        return ARTICLE
    return PRE if tag in ("pre", "listing", "xmp") else ""


class _TreeBuilder(HTMLParser):
    """Builds the ``_Node`` tree of a page (see the module docstring, 1.), and collects its
    body, ``<main>``s and top-level ``<article>``s outside nav/aside."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = _Node("#document")
        self.stack = [self.root]
        self.open: dict[str, int] = {}  # open elements per tag
        self.body: _Node | None = None
        self.mains: list[_Node] = []
        self.articles: list[_Node] = []
        # open elements of the kinds NEVER (their content goes nowhere), MAIN and ARTICLE
        self.never = self.in_main = self.in_article = 0
        self.boiler = 0  # open SEMANTIC elements

    # -- the stack ------------------------------------------------------------------------------
    def _close_through(self, index: int) -> None:
        """Pops the stack's elements from the top down to ``index`` inclusive."""
        stack, open_ = self.stack, self.open
        while len(stack) > index:
            node = stack.pop()
            open_[node.tag] -= 1
            if node.kind or node.mark == SEMANTIC:
                self._count_kind(node, -1)

    def _count_kind(self, node: _Node, step: int) -> None:
        """Keeps the counters of open elements by kind in step with the stack (as ``open``, the
        counts per tag, is kept where elements are pushed and popped)."""
        kind = node.kind
        if kind == NEVER:
            self.never += step
        elif kind == MAIN:
            self.in_main += step
        elif kind == ARTICLE:
            self.in_article += step
        if node.mark == SEMANTIC:
            self.boiler += step

    def _find(self, tags, boundary=frozenset()) -> int:
        """The stack index of the nearest open element of ``tags`` above any ``boundary``
        element, or -1."""
        for t in tags:  # (most tags are not open at all: no walk)
            if self.open.get(t):
                break
        else:
            return -1
        stack = self.stack
        for i in range(len(stack) - 1, 0, -1):
            tag = stack[i].tag
            if tag in tags:
                return i
            if tag in boundary:
                return -1
        return -1

    def _open(self, tag: str, attrs: dict) -> None:
        # (a tag without attributes is one of no kind, or one that its tag alone says)
        kind = _kind(tag, attrs) if attrs or tag in _KIND_TAGS else ""
        if kind == NEVER or kind == MAIN or not (attrs or tag in _MARK_TAGS):
            node = _Node(tag, 0, kind)
        else:
            node = _Node(tag, _mark(tag, attrs, self.in_main + self.in_article > 0), kind)
        if kind != NEVER:  # (never text: detached, nothing of it reaches the tree)
            self.stack[-1].kids.append(node)
            if tag == "body" and self.body is None:
                self.body = node
            if kind and not self.boiler:  # (an article teaser in an aside is not one)
                if kind == MAIN:
                    self.mains.append(node)
                elif kind == ARTICLE and not self.in_article:
                    self.articles.append(node)
        self.stack.append(node)  # (``_push``, inline: once a tag)
        self.open[tag] = self.open.get(tag, 0) + 1
        if kind or node.mark == SEMANTIC:
            self._count_kind(node, +1)

    # -- parser callbacks -----------------------------------------------------------------------
    def handle_starttag(self, tag, attrs):
        is_open = self.open.get
        if is_open("head") and tag not in _HEAD_CONTENT and (i := self._find(("head",))) > 0:
            self._close_through(i)  # body content ends a head that was never closed
        if self.never and tag not in _NEVER_TEXT:
            return  # (inside script/svg/...: no tree, but a nested svg is still counted)
        if tag in _P_CLOSERS and is_open("p") and (i := self._find(("p",), _BUTTON_SCOPE)) > 0:
            self._close_through(i)
        if tag in _IMPLIED and (i := self._find(*_IMPLIED[tag])) > 0:
            self._close_through(i)
        if tag in _VOID:
            if tag == "br" or tag == "hr":
                self.stack[-1].kids.append(_Node(tag))
            return
        if len(self.stack) > MAX_DEPTH and tag not in _NEVER_TEXT:
            return  # flattened: its content goes to the open element
        self._open(tag, dict(attrs) if attrs else _NO_ATTRS)

    def handle_startendtag(self, tag, attrs):
        # "<div/>" (XHTML): an empty element; browsers would leave it open, swallowing the rest
        self.handle_starttag(tag, attrs)
        if tag not in _VOID:
            self.handle_endtag(tag)

    def handle_endtag(self, tag):
        if tag == "body" or tag == "html":
            return  # text after </body> is still shown (and kept) by browsers
        if self.never and tag not in _NEVER_TEXT:
            return
        stack = self.stack
        if stack[-1].tag == tag and len(stack) > 1:  # (the open element's own end tag, mostly)
            self._close_through(len(stack) - 1)
        elif self.open.get(tag) and (i := self._find((tag,))) > 0:
            self._close_through(i)  # (a stray end tag, no such open element: ignored)

    def handle_data(self, data):
        top = self.stack[-1]
        if top.tag == "head" and data.strip():
            self._close_through(len(self.stack) - 1)  # text ends the head, as a body tag does
            top = self.stack[-1]
        if not self.never:
            top.kids.append(data)

    # -- the tokenizer --------------------------------------------------------------------------
    def updatepos(self, i: int, j: int) -> int:
        return j  # (line and column, for getpos(): never read here, and ~5% of the time)

    def goahead(self, end):
        """Text up to the next "<", plain start tags (``_FAST_START``), end tags (html.parser's
        own ``endtagfind``), script/style content and the constructs html.parser's methods
        parse whole (tags of other forms, comments, declarations, processing instructions)
        are read here; at the first thing that is none of these (text running to the end of
        what was fed, a construct cut short, a "<" that starts none) the rest goes to
        html.parser's own loop, which handles those cases. Everything here gives the events
        that loop gives (``convert_charrefs=True``: character references decoded in text).
        Under another html.parser, its own loop from the start."""
        if not _FAST_LOOP:
            return HTMLParser.goahead(self, end)
        rawdata = self.rawdata
        i, n = 0, len(rawdata)
        find, startswith = rawdata.find, rawdata.startswith
        start_match, end_match = _FAST_START.match, _stdlib_parser.endtagfind.match
        attrs_of, cdata_tags = _FAST_ATTR.findall, self.CDATA_CONTENT_ELEMENTS
        while i < n:
            if self.cdata_elem is None:
                j = find("<", i)
            else:
                m = self.interesting.search(rawdata, i)
                j = m.start() if m else -1
            if j < 0:
                break  # (text to the end: a character reference may be cut; the loop below)
            if i < j:
                text = rawdata[i:j]
                decode = self.cdata_elem is None and "&" in text
                self.handle_data(unescape(text) if decode else text)
                i = j
            if self.cdata_elem is None:  # (parse_endtag ends a script or style's content)
                if m := start_match(rawdata, i):
                    self._fast_starttag(m, attrs_of, cdata_tags)
                    i = m.end()
                    continue
                if startswith("</", i) and (m := end_match(rawdata, i)):
                    self.handle_endtag(m[1].lower())
                    i = m.end()
                    continue
            if _stdlib_parser.starttagopen.match(rawdata, i):
                k = self.parse_starttag(i)
            elif startswith("</", i):
                k = self.parse_endtag(i)
            elif startswith("<!--", i):
                k = self.parse_comment(i)
            elif startswith("<?", i):
                k = self.parse_pi(i)
            elif startswith("<!", i):
                k = self.parse_html_declaration(i)
            else:
                k = -1
            if k < 0:
                break
            i = k
        self.rawdata = rawdata[i:]
        if self.rawdata:
            HTMLParser.goahead(self, end)
        elif end:
            HTMLParser.goahead(self, end)  # (nothing left: its end-of-input steps, if any)

    def _fast_starttag(self, m, attrs_of, cdata_tags) -> None:
        """The events of a ``_FAST_START`` match, as html.parser's ``parse_starttag`` gives
        them for it (names lower-cased, quotes stripped, references decoded in values)."""
        tag = m[1].lower()
        self.lasttag = tag
        attrs = []
        if m[2]:
            for name, value in attrs_of(m[2]):
                if not value:  # ("": no value, as a value is quoted or not empty)
                    value = None
                elif value[0] == "'" or value[0] == '"':
                    value = value[1:-1]
                    if "&" in value:
                        value = unescape(value)
                elif "&" in value:
                    value = unescape(value)
                attrs.append((name.lower(), value))
        if m[3]:
            self.handle_startendtag(tag, attrs)
        else:
            self.handle_starttag(tag, attrs)
            if tag in cdata_tags:
                self.set_cdata_mode(tag)


_NO_ATTRS: dict = {}
_MARK_TAGS = _SEMANTIC | _PAGE_LEVEL | {"form"}  # (the tags that ``_mark`` marks by themselves)
_KIND_TAGS = _NEVER_TEXT | {"a", "main", "article", "pre", "listing", "xmp"}  # (see _kind)


def _measure(node: _Node) -> None:
    """Sets the text measures of ``node`` and its subtree (``_Node``); SEMANTIC subtrees count
    for nothing, as they are never text."""
    in_link = node.kind == LINK
    for kid in node.kids:
        if isinstance(kid, str):
            n = len("".join(kid.split()))
            node.chars += n
            node.link_chars += n if in_link else 0
            continue
        _measure(kid)
        if kid.mark == SEMANTIC:
            continue
        node.chars += kid.chars
        node.link_chars += kid.chars if in_link else kid.link_chars
        node.links += kid.links
    node.links += 1 if in_link else 0


def _main_node(tree: _TreeBuilder) -> _Node:
    """The element whose text is the page's (the module docstring, 3.)."""
    page = tree.body or tree.root
    need = SUBSTANTIAL * page.chars
    tops = sorted((a for a in tree.articles if a.chars), key=lambda a: -a.chars)
    if tops and tops[0].chars >= need and (len(tops) == 1 or tops[0].chars >= 2 * tops[1].chars):
        return tops[0]
    mains = [m for m in tree.mains if m.chars]
    if mains and (best := max(mains, key=lambda m: m.chars)).chars >= need:
        return best
    return page


class _Lines:
    """The rendered text, line by line (the module docstring, 5.)."""

    def __init__(self, prune_links: bool, total: int):
        self.lines: list[str] = []
        self.parts: list[str] = []
        self.prefix = ""  # the open list item's bullet, for its first line
        self.lists: list[list] = []  # [tag, items so far] of each open list
        self.prune_links, self.total = prune_links, total

    def flush(self) -> None:
        if self.parts:
            # whitespace runs → one space: split() and join, not re.sub(r"\s+", " "): faster, and
            # str.split's whitespace is exactly re's \s (str.isspace)
            line = " ".join("".join(self.parts).split())
            if "\x00" in line:
                line = _CELL.sub("\t", line).strip(" \t")
            self.parts = []
            if line:
                self.lines.append(self.prefix + line)
                self.prefix = ""

    def dropped(self, node: _Node) -> bool:
        """Whether ``node`` is left out: boilerplate, or a link-dense block (docstring, 2. 4.)."""
        if node.mark == SEMANTIC:
            return True
        small = node.chars < GUARD * self.total
        if node.mark == GUARDED and small:
            return True
        return (self.prune_links and small and node.tag in _LINK_CHECKED and node.links >= 2
                and node.link_chars >= LINK_DENSITY * node.chars)  # fmt: skip

    def render(self, node: _Node) -> None:
        tag = node.tag
        if tag in ("br", "hr"):
            self.flush()
            return
        if node.kind == PRE:
            self.pre(node)
            return
        block = tag in _BLOCK
        if block:
            self.flush()
        if tag in _LISTS:
            self.lists.append([tag, 0])
        elif tag == "li":
            self.item()
        elif tag in ("td", "th"):
            self.parts.append("\x00")
        for kid in node.kids:
            if isinstance(kid, str):
                self.parts.append(kid)
            elif not self.dropped(kid):
                self.render(kid)
        if tag in _LISTS:
            self.lists.pop()
        if block:
            self.flush()

    def item(self) -> None:
        """Starts a list item: its bullet, indented two spaces a level of nesting."""
        if not self.lists:
            self.lists.append(["ul", 0])  # a stray <li>: a list of its own
        self.lists[-1][1] += 1
        kind, n = self.lists[-1]
        self.prefix = "  " * (len(self.lists) - 1) + (f"{n}. " if kind == "ol" else "- ")

    def pre(self, node: _Node) -> None:
        """A ``<pre>`` block as it is: whitespace kept, the newline after ``<pre>`` dropped."""
        self.flush()
        text = "".join(_raw_text(node)).replace("\r\n", "\n").removeprefix("\n")
        lines = [ln.rstrip() for ln in text.rstrip().split("\n")]
        if any(lines):
            self.lines.append(self.prefix + "\n".join(lines))
            self.prefix = ""


def _raw_text(node: _Node):
    """The text of ``node``'s subtree as it is (boilerplate inside a <pre> still left out)."""
    for kid in node.kids:
        if isinstance(kid, str):
            yield kid
        elif kid.tag == "br":
            yield "\n"
        elif kid.mark != SEMANTIC:
            yield from _raw_text(kid)


def html_to_text(html: str, *, prune_links: bool = True) -> str:
    """The main text of an HTML page: lines of text separated by "\\n", "" when it has none (the
    module docstring says how). Never raises on broken markup; only the first
    ``MAX_HTML_CHARS`` characters are parsed. ``prune_links=False`` keeps link-dense blocks."""
    tree = _TreeBuilder()
    try:
        tree.feed(html[:MAX_HTML_CHARS].replace("\x00", ""))  # (NUL: the cell separator)
        if tree.rawdata.startswith("<"):  # an unclosed comment or tag at the end: not text
            tree.rawdata = ""
        tree.close()
    except Exception:  # (html.parser is lenient; whatever it still refuses ends the page there)
        pass
    _measure(tree.root)
    main = _main_node(tree)
    out = _Lines(prune_links, main.chars)
    out.render(main)
    out.flush()
    return "\n".join(out.lines)
