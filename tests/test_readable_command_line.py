"""What our commands print is for our user: `train.py --help` names each default once (and no "(default: None)"),
and java's PTBTokenizer chatter ("Untokenizable" warnings, its speed) stays out of the caption metrics' output
while its errors still show. Needs java (PTBTokenizer), like the metric itself.

    python -m pytest -q tests/test_readable_command_line.py
"""

import re

import pytest

import metrics
import train


def help_of_each_option() -> dict:
    """{--flag: its help text as --help prints it}."""
    parser = train.build_parser()
    formatter = parser._get_formatter()
    return {action.option_strings[0]: formatter._expand_help(action) for action in parser._actions if action.help}


def test_help_names_each_default_once(capsys):
    with pytest.raises(SystemExit):
        train.parse_config(["--help"])
    printed = " ".join(capsys.readouterr().out.split())  # --help wraps lines
    assert "(default: None)" not in printed and "(default: )" not in printed
    helps = help_of_each_option()
    assert {flag: text.count("(default") for flag, text in helps.items() if text.count("(default") > 1} == {}
    assert printed.count("(default") == sum(text.count("(default") for text in helps.values())
    # The values a bare `python train.py` (the embedded preset) runs with, then the other presets' where they differ.
    assert helps["--epochs"].endswith("(default: 5; 3 with --preset llava or vila)")
    assert helps["--lam"].endswith("(default: 2)") and helps["--resume"].endswith("(default: off)")
    assert helps["--image-folder"].endswith("(default: the JSON's folder)")  # the comment's own default, once
    assert "(default" not in helps["--train"]  # unset (None): nothing to show


def test_help_defaults_are_the_parsed_defaults():
    """Each "(default: X)" shown for the default preset is what an empty command line gives."""
    parsed = train.make_config()
    for flag, text in help_of_each_option().items():
        match = re.search(r"\(default: ([^;)]*)[;)]", text)
        name = flag[2:].replace("-", "_")
        if match and hasattr(parsed, name) and name not in ("base_epochs", "compare", "data_dir", "image_folder",
                                                            "reg_lam", "mi_pgd_steps", "lora_alpha",
                                                            "lora_targets"):  # defaults in words
            value = getattr(parsed, name)
            shown = {True: "on", False: "off"}.get(value) if isinstance(value, bool) else \
                f"{value:g}" if isinstance(value, float) else str(value)
            assert match.group(1) == shown, (flag, text, value)


ODD_CAPTIONS = {"1": "a red \ue000 circle on the left", "2": "a blue \ufffd square\u2060 at the top"}
REFERENCES = {"1": ["a red circle on the left", "a red circle"], "2": ["a blue square at the top", "a square"]}


def test_untokenizable_characters_print_nothing(capfd):
    """U+E000 and U+FFFD make java's PTBTokenizer log "WARNING: Untokenizable: ..." to stderr; they are dropped
    from the caption, which scores as without them."""
    odd = metrics.caption_metrics(ODD_CAPTIONS, REFERENCES)
    captured = capfd.readouterr()
    assert "Untokenizable" not in captured.err + captured.out and "PTBLexer" not in captured.err
    assert "tokens per second" not in captured.err
    assert captured.err == "" and captured.out == ""
    plain = metrics.caption_metrics({"1": "a red circle on the left", "2": "a blue square at the top"}, REFERENCES)
    assert odd == plain


def test_the_tokenizers_errors_still_show(capfd, monkeypatch):
    """Only the chatter is dropped: a java that cannot run the tokenizer still says why on stderr."""
    from pycocoevalcap.tokenizer import ptbtokenizer

    monkeypatch.setattr(ptbtokenizer, "STANFORD_CORENLP_3_4_1_JAR", "no-such.jar")
    try:
        metrics.ptb_tokenize({"1": ["a red \ue000 circle"]})
    except RuntimeError:  # the tokenizer returned nothing usable
        pass
    err = capfd.readouterr().err
    assert "PTBTokenizer" in err and "Untokenizable" not in err  # "Could not find or load main class ..."
