"""HTML → main text (data/html_text.py): boilerplate left out, the main content kept, entities,
<pre>, lists and tables, broken markup, and link-dense blocks pruned where that helps."""

import pytest

from flaxlm.data import html_text
from flaxlm.data.html_text import html_to_text

PAGE = """<!DOCTYPE html><html><head><title>Rivers | Nature blog</title>
<meta charset="utf-8"><style>p { color: red }</style><script>var x = "<p>not text</p>";</script>
</head><body class="single has-sidebar">
<header class="site-header"><a href="/">Nature blog</a></header>
<nav><ul><li><a href="/">Home</a></li><li><a href="/about">About</a></li></ul></nav>
<div id="cookie-banner">We use cookies to improve your experience. <button>OK</button></div>
<main><article>
<header><h1>Why rivers   meander</h1><p class="byline">By Ann, 3 May</p></header>
<p>A river bends because water flows faster on the outside of a curve,
   eroding the bank there.</p>
<p>On the inside, slow water drops sand &amp; gravel: the bend grows.</p>
<div class="share-buttons"><a href="/s/fb">Share on Facebook</a> <a href="/s/x">Post</a></div>
</article>
<section id="comments"><h2>2 comments</h2><p>Great post!!! Visit my site</p></section>
</main>
<aside class="sidebar"><h3>Popular</h3><p>Mountains, explained.</p></aside>
<footer><p>&copy; 2024 Nature blog</p></footer>
<noscript>Enable JavaScript.</noscript><svg><text>icon</text></svg>
</body></html>"""


def test_boilerplate_is_left_out_and_the_article_kept():
    assert html_to_text(PAGE) == (
        "Why rivers meander\n"
        "By Ann, 3 May\n"  # (a header inside the article is its headline, not the site's)
        "A river bends because water flows faster on the outside of a curve, eroding the bank "
        "there.\n"
        "On the inside, slow water drops sand & gravel: the bend grows."
    )


def test_entities_whitespace_and_the_title():
    html = (
        "<title>Not body text</title><p>caf&eacute; &#233; &#xE9; &lt;tag&gt; &quot;q&quot; "
        "&#39;s&#39; a&nbsp;&nbsp;b\t\n c &unknown; AT&T</p>"
    )
    assert html_to_text(html) == "café é é <tag> \"q\" 's' a b c &unknown; AT&T"


def test_pre_keeps_its_whitespace_and_inline_text_does_not():
    html = (
        "<p>Run   <code>make</code>\n  then:</p><pre>\n"
        "def f(x):\n    return  x * 2\n\n\nprint(f(<b>3</b>))\n</pre><p>Done.</p>"
    )
    assert html_to_text(html) == (
        "Run make then:\ndef f(x):\n    return  x * 2\n\n\nprint(f(3))\nDone."
    )


def test_nested_lists_tables_and_line_breaks():
    html = """<ul><li>Fruit<ul><li>apple</li><li>pear<ol><li>conference</li><li>williams</li>
    </ol></li></ul></li><li>Bread</li></ul>
    <table><tr><th>Name</th><th>Age</th></tr><tr><td>Ann</td><td> 31 </td></tr></table>
    <p>one<br>two<br/>three</p><h2>Heading</h2>text after"""
    assert html_to_text(html) == (
        "- Fruit\n  - apple\n  - pear\n    1. conference\n    2. williams\n- Bread\n"
        "Name\tAge\nAnn\t31\none\ntwo\nthree\nHeading\ntext after"
    )


@pytest.mark.parametrize("html, text", [
    # unclosed <p>, <li>, <td>, <tr>: closed by the next one, as browsers do
    ("<p>one<p>two<ul><li>a<li>b</ul>", "one\ntwo\n- a\n- b"),
    ("<table><tr><td>a<td>b<tr><td>c<td>d</table>", "a\tb\nc\td"),
    # stray end tags are ignored; unclosed inline tags end with the page
    ("<div>x</span></p></div></div>y <b>bold <i>and italic", "x\ny bold and italic"),
    # an unclosed comment or tag at the end is not text
    ("<p>kept</p><!-- never closed <p>lost", "kept"),
    ("<p>kept</p><a href='x", "kept"),
    # no <html>/<body>, text in an unclosed <head>, an XHTML empty element
    ("<head><title>t</title>Text in head<p>para", "Text in head\npara"),
    ("plain <div/>text", "plain\ntext"),
    ("a < b and c <3 d", "a < b and c <3 d"),
    # a <script> holding markup, and one never closed
    ("<p>a</p><script>document.write('<p>b</p>')</script><p>c", "a\nc"),
    ("<p>a</p><script>never closed <p>b", "a"),
    # an <a name> anchor around a heading is not a link (the heading stays)
    ("<a name='s1'><h2>Section</h2></a><p>Body text of the section.</p>",
     "Section\nBody text of the section."),
    ("", ""),
    ("<html><body></body></html>", ""),
])  # fmt: skip
def test_broken_markup(html, text):
    assert html_to_text(html) == text


def test_deep_nesting_and_the_size_cap(monkeypatch):
    deep = "<div><span>" * 5000 + "deep text" + "</span></div>" * 5000
    assert html_to_text(deep) == "deep text"  # (nesting past MAX_DEPTH is flattened)
    monkeypatch.setattr(html_text, "MAX_HTML_CHARS", 40)
    assert html_to_text("<p>first paragraph</p><p>second paragraph</p>") == (
        "first paragraph\nsecond paragrap"  # only the first 40 characters are parsed
    )


def test_hidden_and_class_marked_blocks_only_when_small():
    html = """<body><div class="menu-main"><a href="/">Home</a></div>
    <div style="display: none">Hidden text</div><div hidden>Also hidden</div>
    <p>The content of the page is this paragraph, long enough to be most of it.</p>
    <div class="comment-list"><p>First!</p></div><div class="commentary">Commentary stays.</div>
    </body>"""
    assert html_to_text(html) == (
        "The content of the page is this paragraph, long enough to be most of it.\n"
        "Commentary stays."  # ("commentary" is not "comment")
    )
    # a form wrapping the whole page (ASP.NET), a wrapper whose class names its sidebar state
    assert html_to_text("<form id='aspnetForm'><p>All of the page.</p></form>") == (
        "All of the page."
    )
    assert html_to_text("<div id='page' class='page-with-sidebar'><p>Page text.</p></div>") == (
        "Page text."
    )


def test_article_or_main_when_substantial():
    listing = "<body><h1>Blog</h1>" + "".join(
        f"<article><h2>Post {i}</h2><p>Teaser of post number {i}.</p></article>" for i in range(3)
    )
    # three articles of one size: a listing, the body is the page
    assert html_to_text(listing) == "Blog\n" + "\n".join(
        f"Post {i}\nTeaser of post number {i}." for i in range(3)
    )
    tiny = "<body><div>" + "Long text outside of the main element. " * 20 + "</div>"
    tiny += "<main><p>Small main.</p></main></body>"
    assert html_to_text(tiny).endswith("Small main.")  # (too small to be the page: all kept)
    teaser = "<body><p>Intro line.</p><div role='main'><p>" + "Main text. " * 10 + "</p></div>"
    teaser += "<aside><article><p>" + "Teaser. " * 50 + "</p></article></aside></body>"
    assert html_to_text(teaser) == ("Main text. " * 10).strip()  # (an aside's article is none)


# Pages whose menus no tag, class or id marks (table layouts, plain divs): link-density pruning
# is what leaves them out. Measured on these four: 29 lines of boilerplate kept without it, 2
# with it ("Front page - Archive - Subscribe" and the copyright line under it: 47% anchor
# text), no content line lost either way.
BLOG = """<body><div id="top"><h2><a href="/">Cooking at home</a></h2>
<ul><li><a href="/">Home</a></li><li><a href="/recipes">Recipes</a></li>
<li><a href="/about">About us</a></li></ul></div>
<div class="post"><h1>How to bake sourdough bread</h1>
<p>Feed the starter the evening before. Read <a href="/starter">our guide</a> if it is slow.</p>
<ul><li>500 g bread flour</li><li>350 g water</li></ul>
<p>Tags: <a href="/t/bread">bread</a>, <a href="/t/baking">baking</a></p></div>
<div><h3>Popular posts</h3><ul><li><a href="/1">The best pancakes you will ever make</a></li>
<li><a href="/2">Ten soups for a cold winter evening</a></li></ul></div>
<div id="bottom"><a href="/privacy">Privacy</a> | <a href="/terms">Terms</a></div></body>"""
NEWS = """<body><table><tr><td><a href="/world">World</a><br><a href="/politics">Politics</a><br>
<a href="/sport">Sport</a></td><td><h1>Council approves new cycle lanes</h1>
<p>The city council voted on Tuesday to build twelve kilometres of protected cycle lanes.</p>
<p>Shop owners on Main Street worried about parking; the plan keeps three loading bays.</p>
<div><b>More stories</b><br><a href="/a">Bridge closed for repairs until spring</a><br>
<a href="/b">School budget rises by four percent</a></div></td></tr></table></body>"""
LINKS = """<body><h1>Useful tools</h1><p>Tools we use every day:</p>
<ul><li><a href="https://a.org">A text editor with a good search</a></li>
<li><a href="https://b.org">A calendar that syncs</a></li></ul></body>"""


def test_link_dense_blocks_are_pruned():
    assert html_to_text(BLOG) == (
        "How to bake sourdough bread\n"
        "Feed the starter the evening before. Read our guide if it is slow.\n"
        "- 500 g bread flour\n- 350 g water"
    )
    assert "Home" in html_to_text(BLOG, prune_links=False)
    assert html_to_text(NEWS) == (
        "Council approves new cycle lanes\n"
        "The city council voted on Tuesday to build twelve kilometres of protected cycle lanes.\n"
        "Shop owners on Main Street worried about parking; the plan keeps three loading bays."
    )
    unpruned = html_to_text(NEWS, prune_links=False).split("\n")
    assert unpruned[:3] == ["World", "Politics", "Sport"] and len(unpruned) == 9
    # a page that is a list of links stays one: its list holds most of its text
    assert html_to_text(LINKS) == (
        "Useful tools\nTools we use every day:\n"
        "- A text editor with a good search\n- A calendar that syncs"
    )
