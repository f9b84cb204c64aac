"""The HTML grid of example cards: user data is escaped, flags show, notes span the row."""
from app.services.cards import FEATURES_SHOWN, Card, cards_html


def test_cards_escape_user_data_and_show_flags():
    html = cards_html([Card(index=3, lines=["#3 · <b>label</b> & co"], image="data:image/png;base64,AAAA",
                            flag="mislabeled"),
                       Card(index=7, lines=["x"], text="<script>alert(1)</script> a sentence")], per_row=4, size=64)
    assert html.count('class="pp-card"') == 2
    assert 'data-index="3"' in html and 'data-index="7"' in html
    assert "<b>label</b>" not in html and "&lt;b&gt;label&lt;/b&gt; &amp; co" in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert 'src="data:image/png;base64,AAAA"' in html and 'width="64"' in html
    first = html.split('data-index="3"')[1].split("</figure>")[0]
    second = html.split('data-index="7"')[1].split("</figure>")[0]
    assert "mislabeled" in first and "#d62728" in first  # the flag, in its colour
    assert "pp-flag" not in second  # no flag, no badge
    assert "grid-template-columns:repeat(4," in html


def test_tabular_card_shows_some_features_and_the_rest_in_its_tooltip():
    row = {f"f{i}": float(i) / 3 for i in range(FEATURES_SHOWN + 3)}
    html = cards_html([Card(index=0, lines=[], row=row)])
    shown = html.split('class="pp-row"')[1].split("</figure>")[0]
    assert "f0: 0" in shown and f"f{FEATURES_SHOWN - 1}:" in shown and f"f{FEATURES_SHOWN}:" not in shown
    assert f"f{FEATURES_SHOWN + 2}=" in html.split("title=")[1].split(">")[0]  # all of them on hover


def test_note_spans_the_rest_of_the_row():
    html = cards_html([Card(index=1, lines=[]), Card(index=2, lines=[])], per_row=5, note=["Why: <exact> copy"])
    assert "grid-column:span 3" in html and "Why: &lt;exact&gt; copy" in html
    assert "pp-note" not in cards_html([Card(index=1, lines=[])])
