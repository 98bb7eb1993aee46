"""From BLIP captions to an SDXL prompt: rank the desk objects the captions name, then write a short prompt.

Pure Python (no model imports), deterministic: the same captions, keywords and style always give the
same prompt, so a generated image can be reproduced from its PNG metadata.

Pipeline position (``rank_keywords`` in :mod:`.captions`, ``build_prompt`` in :mod:`.build`)::

    CaptionSet.texts()  --rank_keywords-->  [Keyword("monitor", 4), Keyword("lamp", 2), ...]
                        --build_prompt--->  Prompt(prompt="a desk setup with monitor, lamp, ...", negative_prompt=...)

What real BLIP captions look like, and what this package does about each (fixtures with the expected
prompts: ``tests/data/blip_captions.yaml``):

  * Echoes of the conditional prefix, as BERT's tokenizer writes it back: ``q : what objects are on the
    desk? a : laptop, ...``, ``desk _ setup : _ with a laptop``. :func:`clean_caption` strips the given
    prefixes token by token, any ``q : ... a :`` question and any ``snake _ case :`` tag, then leading
    punctuation. Words of an echoed question ("is there a monitor?") never count as objects.
  * Decoder loops: ``mouse, and mouse``, ``a monitor a monitor a monitor``. Objects are counted once per
    caption, and the prompt lists canonical objects (never caption text), so a loop cannot reach it.
  * Plurals, synonyms, brands, "a pair of": surface forms map to one canonical object through a
    :class:`Vocabulary` ("monitors", "dual monitors", "a dell monitor" -> ``monitor``; "macbook pro" ->
    ``laptop``), longest phrase first.
  * Context: phrases that name no desk object are matched first and consumed ("coffee table" is not a
    mug, "computer desk" is not a computer; :data:`IGNORED_PHRASES`).
  * Objects outside the vocabulary are not guessed into the prompt; :func:`unknown_objects` lists them
    (the captioner logs them) so ops can add them under the Captioner's ``user_config``
    ``vocabulary.extra_objects`` (see :meth:`Vocabulary.extended`).
  * Colours and scene words stay, as words next to what they describe: "a black keyboard" gives
    ``black keyboard`` in the prompt (the keyword stays ``keyboard``), "in a dark room" gives ``dark room``.

Modules, one responsibility each (importers use them directly; this package re-exports nothing):

  * :mod:`deskgen.prompts.vocabulary`: which caption phrases name which desk object (:class:`Vocabulary`,
    the built-in objects and ignored phrases, extensions from config) and the colour / scene / filler
    word lists.
  * :mod:`deskgen.prompts.captions`: reading captions: the default prefixes, cleaning (echoes, loops),
    ranking (:class:`Keyword`, most captions first), colours and scene phrases, unknown objects.
  * :mod:`deskgen.prompts.style`: the text rule for a style (``STYLE_PATTERN``, ``validate_style``).
  * :mod:`deskgen.prompts.build`: writing the prompt within a CLIP token budget (:class:`Prompt`), and the
    default negative prompt.
"""
