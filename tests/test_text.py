"""Clause splitting of streamed LLM text and cleaning for speech (edge.text)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.text import ClauseSplitter, abbreviation_kind, clean_for_speech

REPLY = ("The capital of France is Paris. It has about 2.1 million people, and Dr. Smith says the museum "
         "opens at 9 a.m. every day, e.g. on Mondays. It closes at 5 p.m. Then we go home! Is that 3.5 hours? "
         "Yes.")
EXPECTED = [
    "The capital of France is Paris.",
    "It has about 2.1 million people,",
    "and Dr. Smith says the museum opens at 9 a.m. every day,",
    "e.g. on Mondays.",
    "It closes at 5 p.m.",
    "Then we go home!",
    "Is that 3.5 hours?",
    "Yes.",
]


def split_stream(pieces: list[str], **kw) -> list[str]:
    splitter = ClauseSplitter(**kw)
    out: list[str] = []
    for piece in pieces:
        out += splitter.push(piece)
    return out + splitter.flush()


def chars(text: str) -> list[str]:
    return list(text)


def words(text: str) -> list[str]:
    return re.findall(r"\S+\s*", text)


def fixed(text: str, n: int) -> list[str]:
    return [text[i:i + n] for i in range(0, len(text), n)]


@pytest.mark.parametrize("cut", [chars, words, lambda t: fixed(t, 3), lambda t: fixed(t, 7), lambda t: [t]],
                         ids=["by-char", "by-word", "by-3", "by-7", "whole"])
def test_clauses_are_the_same_however_the_stream_is_cut_into_pieces(cut):
    assert split_stream(cut(REPLY)) == EXPECTED


def test_a_number_split_across_pieces_is_not_cut_at_its_decimal_point():
    assert split_stream(["It is 3", ".", "5 degrees", " outside."]) == ["It is 3.5 degrees outside."]
    assert split_stream(["Pi is about 3.", "14159. Next"]) == ["Pi is about 3.14159.", "Next"]


def test_a_sentence_end_is_not_emitted_until_the_next_character_shows_it_is_one():
    splitter = ClauseSplitter()
    assert splitter.push("The answer is 3.") == []
    assert splitter.push(" Next") == ["The answer is 3."]
    assert splitter.flush() == ["Next"]


def test_a_word_split_mid_word_across_pieces_is_joined():
    assert split_stream(["The cap", "ital of Fr", "ance is Par", "is.", " Yes"]) == [
        "The capital of France is Paris.", "Yes"]


def test_thousands_separators_and_times_are_not_clause_breaks():
    text = "There were 1,000,000 people at 10:30 in the square, and it was crowded. Wow."
    assert split_stream(words(text), first_phrase_words=99) == ["There were 1,000,000 people at 10:30 in the square,",
                                         "and it was crowded.", "Wow."]


@pytest.mark.parametrize("title", ["Dr.", "Mr.", "Mrs.", "Prof.", "St."])
def test_titles_before_a_name_do_not_end_a_sentence(title):
    assert split_stream(chars(f"Ask {title} Jones about it. Then rest.")) == [
        f"Ask {title} Jones about it.", "Then rest."]


def test_e_g_and_i_e_never_end_a_sentence():
    assert split_stream(chars("Try a fruit, e.g. Apples or pears, i.e. Something sweet.")) == [
        "Try a fruit,", "e.g. Apples or pears, i.e. Something sweet."]


def test_time_abbreviations_end_a_sentence_only_before_a_capital():
    assert split_stream(chars("Come at 3 p.m. tomorrow please. Thanks.")) == [
        "Come at 3 p.m. tomorrow please.", "Thanks."]
    assert split_stream(chars("Come at 3 p.m. Tomorrow is busy.")) == ["Come at 3 p.m.", "Tomorrow is busy."]
    assert split_stream(chars("Come at 3 p.m.")) == ["Come at 3 p.m."]


def test_an_ellipsis_inside_a_word_is_not_a_break_but_one_before_a_capital_ends_a_sentence():
    assert split_stream(chars("Well...maybe we could try that again.")) == ["Well...maybe we could try that again."]
    assert split_stream(chars("I was thinking about it... Maybe tomorrow.")) == [
        "I was thinking about it...", "Maybe tomorrow."]
    assert split_stream(chars("Hmm... let me think about this one carefully.")) == [
        "Hmm... let me think about this one carefully."]


def test_soft_breaks_cut_only_once_the_clause_has_a_few_words():
    text = "First of all, yes, I think so, and then we go to the station, buy a ticket, and leave."
    out = split_stream(words(text))
    assert out[0] == "First of all,"  # the first clause may be short: audio starts soon
    assert "yes, I think so, and then we go to the station," in out  # later ones need six words
    assert " ".join(out) == text


def test_the_first_clause_waits_for_three_words_before_a_comma():
    assert split_stream(words("Yes, of course, I can help you with that today.")) == [
        "Yes, of course,", "I can help you with that today."]


def test_semicolons_colons_and_dashes_are_soft_breaks():
    out = split_stream(words("Here is what you need: flour, eggs and milk; then whisk them—gently and slowly."))
    assert out == ["Here is what you need:", "flour, eggs and milk; then whisk them—", "gently and slowly."]


def test_a_long_run_without_punctuation_is_cut_at_a_space():
    text = " ".join(f"word{i}" for i in range(70))
    out = split_stream(words(text), max_words=30, first_max_words=30)
    assert [len(c.split()) for c in out] == [30, 30, 10]
    assert " ".join(out) == text


def test_the_first_clause_is_kept_short_so_the_first_audio_comes_soon():
    text = " ".join(f"word{i}" for i in range(45))
    out = split_stream(words(text))
    assert [len(c.split()) for c in out] == [10, 30, 5]
    assert split_stream(words("One day, a robot woke up on the moon and looked around."))[0] == "One day,"


def test_question_and_exclamation_marks_end_clauses_with_closing_quotes_kept():
    assert split_stream(chars('She said "hello!" Then she left? Yes (really.) Fine.')) == [
        'She said "hello!"', "Then she left?", "Yes (really.)", "Fine."]


def test_markdown_and_emoji_are_stripped_even_when_split_across_pieces():
    out = split_stream(["## Pa", "ris\n", "**The cap", "ital** is `Pa", "ris`.* ", "🎉🇫🇷 Enjoy", " it! 👍"])
    assert out == ["Paris", "The capital is Paris.", "Enjoy it!"]


def test_list_items_on_new_lines_become_clauses_without_bullets():
    out = split_stream(words("You need:\n- flour\n- two eggs\n* milk\nThat is all."))
    assert out == ["You need:", "flour", "two eggs", "milk", "That is all."]


def test_a_numbered_list_item_keeps_its_number_with_its_text():
    text = "Here are the steps:\n1. Mix the flour.\n2. Add two eggs.\n10. Bake it."
    for cut in (chars, words):
        assert split_stream(cut(text)) == ["Here are the steps:", "1. Mix the flour.", "2. Add two eggs.",
                                           "10. Bake it."]
    assert split_stream(chars("1. First thing.\n2. Second thing.")) == ["1. First thing.", "2. Second thing."]
    # a number ending a sentence inside a line is still a sentence end
    assert split_stream(chars("He scored 3. Then 4. Done.")) == ["He scored 3.", "Then 4.", "Done."]


def test_punctuation_and_emoji_alone_are_never_a_clause():
    assert split_stream(["🎉", " ... ", "!!", " **"]) == []
    assert split_stream([]) == []


def test_flush_resets_the_splitter_for_the_next_reply():
    splitter = ClauseSplitter()
    assert splitter.push("Hi, friend") == []
    assert splitter.flush() == ["Hi, friend"]
    assert splitter.push("Yes, it is,") == []  # first-clause rule applies again: two words at least
    assert splitter.push(" ok.") == ["Yes, it is,"]
    assert splitter.flush() == ["ok."]


def test_clean_for_speech_removes_markup_but_keeps_words_digits_and_punctuation():
    raw = "## Title\n- **bold** item with `code`, a [link](http://x.y/z) 😀 and _emphasis_ -- ok .\n1. 3.5% of $20"
    assert clean_for_speech(raw) == "Title bold item with code, a link and emphasis — ok. 1. 3.5% of $20"
    assert clean_for_speech("snake_case stays") == "snake_case stays"


def test_abbreviation_kinds():
    assert abbreviation_kind("Dr.") == "title"
    assert abbreviation_kind("e.g.") == "title"
    assert abbreviation_kind("p.m.") == "end"
    assert abbreviation_kind("U.S.A.") == "end"
    assert abbreviation_kind("Paris.") is None
    assert abbreviation_kind("42.") is None


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=40))
def test_any_piece_boundaries_give_the_same_clauses_and_lose_no_words(sizes):
    pieces, i, k = [], 0, 0
    while i < len(REPLY):
        n = sizes[k % len(sizes)]
        pieces.append(REPLY[i:i + n])
        i, k = i + n, k + 1
    out = split_stream(pieces)
    assert out == EXPECTED
    assert " ".join(out).split() == REPLY.split()


def test_clean_transcript_drops_hallucinated_symbols_and_keeps_words():
    from edge.text import clean_transcript

    assert clean_transcript("♪ Blue road, Romeo ♪ \ufffd") == "Blue road, Romeo"
    assert clean_transcript(" ♪ ♪ ") == ""
    assert clean_transcript("...") == ""
    assert clean_transcript("What is 2 + 2?") == "What is 2 + 2?"


def test_a_long_first_clause_is_cut_before_a_phrase_word_and_later_clauses_are_not():
    text = "Le Grand Paris is the capital of France, located in the north of the country and it is big."
    assert split_stream(words(text)) == ["Le Grand Paris is the capital",
                                         "of France, located in the north of the country and it is big."]
    assert split_stream(words("I set a timer for ten minutes.")) == ["I set a timer for ten minutes."]
    assert split_stream(words("The capital of France is Paris.")) == ["The capital of France is Paris."]
