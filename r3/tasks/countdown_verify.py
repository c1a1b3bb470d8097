"""The Countdown verifier: one answer rule, read in linear time, evaluated exactly.

**Reasoning.** A completion that opens (after blanks) with ``<think>`` starts with a reasoning
block up to its first ``</think>``, where reasoning parsers split it: only the text after it is
read, by the rules below; a block never closed leaves no answer. (Where a chat template's
generation prompt opens the block, :meth:`r3.chat.ChatFormat.decode` puts the opening in front of
the reply.)

**With tags** (``answer_tags=True``) the answer is the content of the last complete ``<answer> ...
</answer>`` block. It is no answer when a later answer tag follows it (an unclosed ``<answer>``, or
one in another spelling: ``<Answer>``, ``< answer >``, ``&lt;answer&gt;``), when a struck-through span
(``<del>``, ``<s>``, ``<strike>`` up to its closing tag) holds it, or when what is next to
the block or after it changes its meaning, by the same rules as the final equation's below, the
text around the block read as a person sees it (``3 * <answer>...``, ``<answer>...</answer>^2``,
``not <answer>...``, ``n\u200bot <answer>...``, ``3 *`` ending the line before, a later answer
that is not the target). Markdown emphasis around words or around the block is left out of that
text (``**Answer:** <answer>...``, :func:`_without_emphasis`).

**Without tags** (``answer_tags=False``) the answer is the *final equation* of the completion.
The text is first read as a person sees it: Unicode spaces and blank-looking characters become
spaces and line separators line breaks, invisible format characters (zero-width spaces, soft
hyphens) and combining marks are dropped, except that a character struck through
(U+0335, U+0336) is dropped with its mark and one under any other overlay mark (a solidus,
U+0338: ``=\u0338``; a double solidus, a vertical line, a tilde) reads as ``\u2260``, HTML
entities are decoded, struck-through markup (``<del>``, ``<s>``, ``<strike>`` up to its closing
tag) becomes a space, superscript and subscript tags read as ``^`` and other HTML-like tags
become spaces (``<answer>`` reads as the word "answer"),
``\\boxed{...}`` reads as "answer ..." and LaTeX's ``\\( \\) \\[ \\]`` are spaces (but a ``\\[`` that ends
its line and a ``\\]`` that starts one read as ``$$``: display math over lines), LaTeX's ``\\times``
and ``\\cdot`` read as ``*``, ``\\div`` as ``/`` and ``\\left(`` / ``\\right)`` as parentheses (a longer
command, ``\\cdots``, is none of them; ``\\frac`` stays another operation; inside an answer block
with tags they are markup, no answer), LaTeX's spaces and style switches, which show nothing
(``\\, \\: \\; \\! \\quad \\qquad \\enspace \\thinspace \\displaystyle \\textstyle`` ...), as a space
(``$\\text{wrong} \\; 25 \\times 4 - 3 = 97$`` and ``Wrong: $\\displaystyle 25 \\times 4 - 3 = 97$`` are
denied), and any other LaTeX command (a backslash and letters) is read past, as a blank, by every
reading of the words, labels and signs before the equation, unless its name is an operator,
negation or supposition word (``\\sqrt``, ``\\log``, ``\\neg``, ``\\not``; also LaTeX's negated relations,
relations and brackets, refused as their Unicode signs are: ``\\ne``, ``\\nRightarrow``, ``\\sim``,
``\\equiv``, ``\\lfloor``), which reads as that word
(``Wrong: $\\mathbf 25 \\times 4 - 3 = 97$``, ``Not \\therefore ...``, ``2 * \\large ...``, ``Wrong \\bf
answer: ...`` are refused; ``\\not`` ending the line before draws its solidus over the equation), a Markdown thematic break (a line of three or more of one of
``- * _``, blanks between: ``---``, ``* * *``) reads as an empty line, but dashes alone right under
a line of text underline it, a Markdown (setext) heading, which reads as one (``This answer is
definitely wrong`` then ``---``: ``# This answer is definitely wrong``), and a CRLF is one line
break; bidirectional control
characters make the completion wrong. The final equation is then the last run of arithmetic text
(ASCII digits, ``+ - * /``, parentheses, ``=``, spaces and tabs) that holds a digit and one of
``+ - * / =``: anything after it that is another equation makes the final equation that one, and a
line break ends a run. A run standing alone (:func:`_restatement`) that only restates the result
(``Verification: 28 = 28``, ``Result = 28``), or after an answer block repeats its equation
(``Check: 5 + 23 = 28 ✓``), is not another equation: it is read as blanks, but one opening with
a number leaves the target there (``Then minus 28 = 28`` is more arithmetic on the result), and a
run with digits apart (``= 2 8``) restates nothing. Prose around it is fine ("The answer is 5 + 23 = 28."), but not what would
change its meaning, so the final equation is rejected (never skipped in favour of an earlier one)
when

* a letter is glued to it (``4x + 3``, ``log(3 + 4)``, ``21 - 2x``), or an operator word
  (``mod``, ``log``, ``root``, ``power``, ``squared``, ``times``, ``multiple``, ``from``, ``x``,
  ``cdot``, LaTeX's ``neg`` (``\\neg (5 + 23 = 28)``), ... :data:`OPERATOR_WORDS`), a negation or denial (``not``, ``isn't``, ``wrong``, ...
  :data:`NEGATIONS`, also ``falsch``, ``faux``, ``sbagliato``, ...) or a word in another alphabet is
  among the four words before or after it (apart by spaces, quotes, parentheses, LaTeX groups and
  brackets, ``\\text{If} we take 5 + 23 = 28``, TeX's ``$``, LaTeX
  commands, which are no words of the four, or Markdown emphasis: ``(wrong) 5 + 23 = 28``, ``If
  $\\huge so 5 + 23 = 28$``; before it also past quotes of any script, ``$``, bullets
  and other symbols that wrap or mark it: ``Wrong: $5 + 23 = 28$``, past a code fence or ``$$``
  that ends the line before, opening the block that holds it (``If`` and a fence, the equation on
  the next line), and then past a bullet, or a dash or star between blanks, that stands there:
  ``Assume - <answer>...``, ``Wrong answer:`` and ``- \\boxed{...}`` on the next line; after it
  also past quotes, ``$`` and such symbols, where an operator sign past them is next to it too:
  ``$5 + 23 = 28$ mod n``, ``\u201c5 + 23 = 28\u201d \u00d7 n``), a supposition
  (``if``, ``suppose``, ``hypothetically``, ``imagine``, ``wenn``, ``si``, ... :data:`HYPOTHETICALS`) is among the four words before it, a denial
  (``Wrong:``, ``This is false:``, ``Answer (wrong):``, ``Failed attempt:``, ``Rejected:``, ``\\text{Wrong}:``, ``[Wrong]:``, :data:`LABEL_DENIALS`) or a word in another
  alphabet (``\u041d\u0435\u0432\u0435\u0440\u043d\u043e:``; a Latin letter with diacritics is Latin) is among the four words before a colon just
  before it, on its line or ending a heading of up to eight words on the line before
  (``Wrong:\n5 + 23 = 28``), or one of :data:`BARE_LABEL_DENIALS` as the whole label
  (``Mistake: 5 + 23 = 28``), also before the colon of a short label chained before it on its
  line (``Wrong: Answer: 5 + 23 = 28``, ``**Incorrect:** - **Result:** ...``) or in a heading on
  the last line before the line that it, its labels or bullets start, blank lines apart: ending
  in a colon, a Markdown heading (``### Wrong answer``) or up to four words with no digit or ``. , ; ! ?``
  (``**Wrong answer**``); lines of marks alone (``___``) count as blank, a numbered item's number
  (``1.``, ``2)``) as a bullet, a number in a label as one of its words (``Wrong step 2:``), and
  a bare denial chained after another label as the whole label (``Answer: Mistake:``), or
  ``of`` / ``by`` / ``to`` / ``from`` / ``for`` right after a number (``50% of``, ``1/2 of``,
  ``two of``, ``3 by``, ``add 29 + 13 to``) comes just before it;
* next to it (spaces apart or glued) is a symbol of an operation the task does not allow or a
  number in another script: ``^ % | ~ \\ [ ] { } < >``, ``!`` after it (unless it follows a
  written result: ``= 7!``; ``= 7 != n`` is refused) or glued before it, any Unicode math symbol (``× ÷ − √ ≥ ≈ →``) or
  operator-like symbol (``· ✕ ➕ ➖``, and the full-width, small and other forms of ``* / % ^ -``:
  ``＊ ／ ％ ＾ ﹡ ⁎ ‰``), superscript or non-ASCII digit (``² ½ ٣``), a dash before
  it (``‐5``), or any other symbol between it and more arithmetic (a number, an operator, a math
  sign), ``*`` or ``/`` with a number, number word or one-letter variable past it, quotes apart
  (``* two``, ``/'2'``, ``n *``), a one-letter variable (not ``a``, ``A`` or ``I``) before it
  that opens with a parenthesis, blanks, wrapping symbols and LaTeX commands apart (``f (5 + 23) = 28``, ``f \\bf (5 + 23) = 28``, ``g
  $(5 + 23)$``, ``f <answer>(5 + 23)</answer>``: a function applied, or a product; glued,
  ``f(5 + 23)``, it is a letter glued to it); a cross mark (``❌ ✗ ✘ ✖ ☒ 🚫 👎``, :data:`DENIAL_MARKS`) before or after
  it; a ``?`` (or another form of it: ``？ ❓ ⁇ ‽``) after it or within four words after it in its sentence (a question: ``Is 5 + 23 =
  28?``, ``5 + 23 = 28, right?``, counted from a result written in words: ``5 + 23 gives us 28, is it?``; a code fence, ``$$`` or ``\\]`` closing its block on the next
  line goes on with its sentence: the fence, then ``, right?``, as does a line that opens with a
  comma; the last of a run of marks ends a sentence, ``!?`` and ``...?`` ask, and an ellipsis,
  ``...`` or ``\u2026``, is a pause that ends none), or a tag question ending its sentence at any
  distance: a ``?`` up to three words after a comma, semicolon, colon, dash (also ``--`` or a ``-``
  after a blank), opening parenthesis or ellipsis (``5 + 23 = 28 is my final answer, right?``,
  ``... -- right?``, ``... (right?)``); a dash with a one-letter variable
  past it (``n - <answer>``;
  ``a`` and ``I`` are words);
* a ``.`` or ``,`` glued to it continues a number (``36.5``, ``1,000``, ``.5``), as does a ``.``
  and digits just after it past a tag or a symbol (``<code>5 + 23</code>.5``, ``$5 + 23$.5``);
* it starts its line and the line before ends in an operator or an operator word (``3 *`` then
  ``26 + 24 = 50`` on the next line), also one inside a math or code span that ends that line
  (``$2 \\times$``, or ``2 *`` in backquotes);
* the text after it mentions a number that is neither a given number nor the target
  (``26 + 24 = 50. The answer is 48.``, ``... 50 minus 2``), a word in another alphabet (Cyrillic,
  Greek, CJK, ...: their denials are not read), a number after an answer cue
  (``answer``, ``result``, ``total``, ``equals``, ``gives``, ``get``, ``equation``, ``it's``,
  ``final``, ``####``, ... :data:`ANSWER_CUES`, over linking words, quotes and brackets) that is
  not the target (``The answer is 24.``, ``Final: 24``), a number that is not the target anywhere
  later in the sentence and line of ``answer``, ``result``, ``solution`` or ``total``
  (:data:`SENTENCE_CUES`: ``The answer is therefore 24.``) or made one of them just before it
  (``Actually 24 is the final answer.``, ``26 would then be the result``), a decimal (``50.5``;
  after a cue also ``28,5``), a number in another script, a number next to an operator sign or
  word (``26 \u2212 24``, ``/3``, a spaced `` * 2``, ``I added 26``, ``26 take away 24``) or after
  an operation and ``of`` (``the product of 26 and 24``, ``to the power of 2``), a number word
  after ``times``, ``plus``, ``minus``, ``less`` or ``divided by`` (``Then times two.``), LaTeX ``\\frac``,
  ``\\dfrac``, ``\\tfrac``, ``\\div`` or a ``\\boxed{}`` holding braces, a number word after an
  answer cue, a number word (``thirty-two`` is 32) whose value is not the target in such a
  sentence, after ``(``, ``or``, ``equals``, ``makes``, ``gives``, ``which is``, ... (``, or
  eighteen``, ``which is five``) or when it is 10 or more and not a given number, a given number
  in digits that is not the target after those words but ``(`` (``, which is 23``, ``, or 23``;
  a hedge between them counts too, ``or maybe 23``, :data:`HEDGES`), a cross mark, or
  a negation or denial anywhere (``23 + 11 = 34, is indeed wrong``, ``The answer is not 34``,
  ``No.``, ``I miscalculated``, ``Scratch that.``, ``Forget that.``, ``Forget it.``, ``Just kidding.``, ``I take it
  back.``, ``My bad.``, ``That is a lie.``, ``That fails.``, ``Try again.``, ``Let me start over.``, ``That failed.``, ``It was rejected.``,
  ``I give up.``, ``Discard that.``,
  ``I messed up.``, ``That's way off.``, ``Or is it?``,
  ``Não está certo.``: there a letter with diacritics
  or in a compatibility form, as full-width ``Ｎｏ``, reads as its letter).

What stands before ``<answer>`` or ``\\boxed{`` (read as the word "answer") is checked as if it
stood before the equation itself: ``3 * \\boxed{5 + 23 = 28}`` and ``Wrong: <answer>5 + 23 =
28</answer>`` are wrong.

A Markdown list bullet (``-``, ``*`` or ``+`` first on its line, a blank after it) before the
final equation or answer block is not part of it: ``- 5 + 23 = 28`` and ``* **5 + 23 = 28**`` are
list items, not a unary minus or a product (``-5 + 23`` is a unary minus, and so is ``-\\bf 5 + 23``,
a dash glued to a LaTeX command). Blockquote marks that
open a line (``> 5 + 23 = 28``, ``> > ...``, ``>> ...``; not ``>5`` or ``><answer>``, glued) are
read as blanks, not a comparison, and a Markdown table row (``| 5 + 23 | 28 |``: it starts with a
bar, holds three, its last cell does not end in an operator of any form, ``| 2 \u00d7 |``) ending
the line before leaves no bar open.

Markdown emphasis is left out: a pair of ``*``, ``**`` or ``***`` on a line around words
(``**Answer:** $5 + 23 = 28$``, ``**So 5 + 23 = 28.**``) or around a wrapped equation
(``**$5 + 23 = 28$**``), as around an answer block (:func:`_without_emphasis`), and ``**``, ``*``,
``_``, ``__`` around the equation itself (``*5 + 23 = 28*``, ``_5 + 23 = 28_``), but never a run of
stars with an operand past it, which may be a power (``two **5 + 23 = 28**``, ``n **5 + 23 = 28 is
it**``, ``2**5 + 23``). Markdown bold around it (``**5 + 23 = 28**``), parentheses around a whole equation
(``(5 + 23 = 28)``) and a parenthesis that opens or closes prose next to it (``5 + 23 = 28 (using
both)``) are not part of it. A result written in words after an expression is its written value:
``5 + 12 equals 17``, ``5 + 12 is 17``, ``5 + 12, which is exactly 17`` read as ``5 + 12 = 17``
(up to six linking words, :data:`RESULT_LINKS`); a negation among them, or a result that is not a
plain integer (``17.5``, ``17%``, ``~17``, ``seventeen``), makes it wrong. An expression with no
result at all is an answer only where its sentence gives it as one (:func:`_bare_problem`), and
not with a negation earlier in its clause and no linking or answer word after the negation
(``the math doesn't factor into a simple sum of 3 + 11.``, but not ``I did not subtract and the
answer is 3 + 11.``; the clause starts after the last ``. ! ? , ; :`` or line break,
:data:`CLAUSE_RESETS`).

**Correct iff** the answer is ``expression`` or ``expression = value`` (exactly one ``=``, the
value a plain integer, optionally negative) where the expression uses each given number exactly
once, only the task's binary operators and parentheses (no unary minus or plus, no decimals, no
leading zeros), its exact value (:class:`fractions.Fraction`; a division by zero anywhere fails)
equals the target, and the written value, when present, equals the target too. The expression is
parsed with :mod:`ast` and a whitelist of node types: model output is never evaluated by Python.

Every step is linear in the completion's length (no backtracking regular expression), and the
completion is capped at :data:`MAX_COMPLETION_CHARS`.
"""

from __future__ import annotations

import ast
import bisect
import html
import re
import unicodedata
from collections import Counter
from fractions import Fraction
from typing import Any

from r3.tasks.base import leading_reasoning_end

MAX_ANSWER_CHARS = 256
MAX_COMPLETION_CHARS = 100_000

#: Words that, within four words of the final equation, can change what it means.
OPERATOR_WORDS = frozenset("""
    mod modulo modulus log logs logarithm ln lg exp sqrt cbrt root roots radical sin cos tan abs
    absolute factorial squared cubed square cube power powers pow exponent exponents percent
    percentage negative minus plus times divided multiplied over x \u0445 half twice double triple
    thrice third quarter inverse reciprocal floor ceil ceiling round rounded approximately approx
    roughly multiple multiples factor factors product quotient remainder fraction base radix
    binary octal hex hexadecimal from add
    added subtract subtracted increased decreased increase decrease less more
    doubled tripled halved cdot ast div frac pm mp fois mal halves thirds quarters fourth fourths
    fifth fifths sixth sixths seventh sevenths eighth eighths ninth ninths tenth tenths multiply
    multiplying multiplication divide dividing division negate negated halve raised reduced
    deducted dozen hundred thousand million average mean max maximum min minimum
    neg lnot
    sim simeq approxeq cong equiv propto lfloor rfloor lceil rceil lvert rvert setminus oplus ominus otimes odot
    arcsin arccos arctan arcsec arccsc arccot sinh cosh tanh coth sech csch sec csc cot gcd lcm det
""".split())
#: Words that, within four words of the final equation, deny it ("26 + 24 is not 50").
NEGATIONS = frozenset("""
    not no never nor neither cannot isn't wasn't aren't weren't doesn't don't didn't can't won't
    wouldn't shouldn't couldn't isnt wasnt doesnt dont didnt cant wont wrong incorrect false
    invalid nope untrue undefined impossible unsolvable incorrectly hasn't haven't hadn't ain't hasnt
    havent hadnt isn wasn doesn didn aren weren hasn haven hadn couldn wouldn shouldn contradiction
    contradicts contradictory contradict
    falsch falsche falscher falsches nicht kein keine faux fausse pas incorrecte incorrecto incorrecta
    incorreto incorreta errado errada erroneo errato errata sbagliato sbagliata falso falsa fout niet
    nein feil fel
    inkorrekt inkorrekte verkehrt unrichtig ungultig fehlerhaft inexact inexacte errone erronee non nao
    erronea equivocado equivocada mal scorretto scorretta onjuist onjuiste verkeerd verkeerde inte nej
    ikke nei galet galt felaktig felaktigt uriktig forkert forkerte
    ne neq nequiv ncong nsim napprox nrightarrow nleftarrow nleftrightarrow nexists
""".split())
#: Words that, after the final equation, say it is mistaken ("26 + 24 = 50. I made an error.").
AFTER_DENIALS = frozenset("""
    mistake mistakes mistaken mistakenly error errors erroneous erroneously fallacy miscalculated
    miscalculation miscalculate inaccurate typo typos disregard disregarded
    erreur erreurs fehler errore errori erro erros
    nah nevermind kidding jk retract retracted retracts misspoke miscounted miscount goofed bogus nonsense
    lied oops whoops oopsie fails flawed faulty refuted debunked disproved yikes
    messed overshoots overshot undershoots undershot recalculate recalculating reconsider reconsidering
    redo redoing rethink rethinking slip slipped reevaluate recount overcounts undercounts rework unable differently
    fail failed failure failures reject rejected rejects
""".split())
#: Verbs that, followed by ``that``, ``it`` or ``this`` after the final equation, take it back
#: (``Scratch that.``, ``Forget it.``); ``I take it back`` and the word pairs of :data:`DENIAL_PAIRS` likewise.
_TAKE_BACK = frozenset("scratch forget ignore strike cancel erase delete scrap discard".split())
_TAKEN_BACK = frozenset("that it this".split())  # ("Forget it.", "Ignore this.", as "Forget that.")
#: Two words that, after the final equation, take it back (``My bad.``, ``That is a lie.``,
#: ``Try again.``, ``Uh oh.``, ``Back to the drawing board.``; and what retries write when they
#: take the equation back: ``Let me start over.``, ``Let me try another approach.``, ``That's way
#: off.``, ``Hmm, something's off.``, ``That's too high.``).
DENIAL_PAIRS = frozenset({("my", "bad"), ("a", "lie"), ("try", "again"), ("uh", "oh"), ("drawing", "board"),
                          ("start", "over"), ("try", "another"), ("way", "off"), ("that's", "off"),
                          ("it's", "off"), ("something's", "off"), ("is", "off"), ("was", "off"), ("seems", "off"),
                          ("looks", "off"), ("off", "by"), ("too", "high"), ("too", "low"), ("too", "big"),
                          ("too", "small"), ("too", "large"), ("dead", "end"), ("attempt", "failed"),
                          ("something", "else"), ("square", "one"), ("different", "combination"),
                          ("think", "again"), ("a", "miss"), ("give", "up"), ("gave", "up"), ("giving", "up")})
#: A label of one of these words alone before a colon just before the final equation denies it
#: (``Mistake: 5 + 23 = 28``, ``**Error:**``); in a longer label they name what a retry fixes
#: ("Fixing the mistake: ..."), so only a bare one counts.
BARE_LABEL_DENIALS = frozenset("mistake error typo erroneous bogus fallacy miscalculation".split())
#: Verbs and nouns of arithmetic that, after the final equation and followed by one of
#: :data:`RESULT_OBJECTS`, do more arithmetic on it ("Then double it", "multiply the result").
ARITHMETIC_ACTIONS = frozenset("""
    add adds added adding subtract subtracts subtracted subtracting multiply multiplies multiplied
    multiplying divide divides divided dividing double doubles doubled doubling triple triples
    tripled tripling halve halves halved halving square squares squared squaring cube cubes cubed
    cubing times plus minus increase increases increased decrease decreases decreased raise raises
    raised negate negated reduce reduces reduced deduct deducts deducted multiplication division
    subtraction addition
""".split())
RESULT_OBJECTS = frozenset("it itself themselves result answer sides equation together sum total".split())
#: ... and, before it in its sentence, the objects that make it the operand ("multiplied 12 by
#: both sides of 8 + 4 = 12"; not "it", which is too common there: "Add them and it gives ...").
OPERAND_OBJECTS = frozenset("itself themselves sides".split())
#: Words that may follow a bare expression in its sentence ("5 + 23 is the answer."): anything
#: else makes it a mention in prose, not an answer ("the equation 3 + 11 is a well-known puzzle").
AFTER_BARE = frozenset("""
    is was the my our final answer solution equation correct right indeed and that that's this it it's
    here which target using both numbers number each once exactly
""".split())
_AFTER_BARE_ENDS = frozenset("answer solution equation correct right indeed here target numbers once".split())
#: Words that may link an expression to its result written in words ("5 + 12 equals 17").
RESULT_LINKS = frozenset("""
    is was equals equal equaling equalling to gives give giving makes make making yields yield
    results result resulting in which that would will be get gets got we you it so then this the a
    becomes become comes out as sum total answer value of us me exactly just about around indeed
    actually fact now finally final also really clearly simply should must can could that's it's
    thats its turns turned gave equaled equalled came
""".split())
#: Words after which a number is an answer: a later one that is not the target contradicts the
#: final equation (``####`` is the answer marker of GSM8K-style text).
ANSWER_CUES = frozenset("""
    answer answers result results solution total equals gives makes get gets got yields equation it's final
    answer's result's solution's ####
""".split())
#: Cues after which any number in the rest of the sentence is an answer (``The answer is therefore
#: 23.``, ``The answer is `23`.``).
SENTENCE_CUES = frozenset("answer answers result results solution total answer's result's solution's".split())
#: Between a number and a later answer cue, the words that make the number the answer (``24 is
#: the final answer``, ``24 would then be my answer``): a verb, up to two of these before it and
#: up to four after it.
_SUBJECT_VERBS = frozenset("is was be becomes remains s".split())  # (s: "24's the answer")
_SUBJECT_FILLERS = frozenset("""
    the my our final correct right real true actual only new last proper exact intended then therefore
    thus so actually really clearly indeed also definitely certainly surely probably will would should
    must could might
""".split())
#: Words just before a number (word or digits) that make it a stated result (``, or eighteen``,
#: ``which is five``, ``, which is 23``, ``or 23``); ``is``, ``was`` and ``be`` only after
#: :data:`_STATING`, and one of :data:`HEDGES` may stand between (``or maybe 23``, ``or rather 23``).
STATING_WORDS = frozenset("equals equal makes gives yields or".split())
_STATING = frozenset("which that would will should must".split())
HEDGES = frozenset("maybe perhaps possibly probably rather even actually really".split())
#: Before the final equation, within four words, words that make it a supposition, not an answer.
#: (also the other languages' words for "if" and "suppose" beside a listed denial language's:
#: ``Wenn 5 + 23 = 28``, ``Si 5 + 23 = 28``, ``Supongamos que 5 + 23 = 28``)
HYPOTHETICALS = frozenset("""
    if whether suppose supposing assume assuming unless hypothetically imagine imagining pretend pretending
    wenn angenommen si supposons supposant admettons supongamos suponiendo supongo supponiamo
    supponendo suponhamos supondo suponha indien aangenomen hvis dersom ifall antag antaget
""".split())
#: Words that, among the four words before a colon just before the final equation, deny it
#: (``Wrong:``, ``This is false:``, ``Nope:``, and the other languages' words for "wrong" of
#: :data:`NEGATIONS`: ``Falsch:``, ``Faux :``, ``Incorrecto:``, which denied it without the colon).
LABEL_DENIALS = frozenset("""
    wrong incorrect incorrectly false invalid untrue not isn't wasn't
    nope falsch falsche falscher falsches faux fausse incorrecte incorrecto incorrecta incorreto
    incorreta errado errada erroneo errato sbagliato sbagliata falso falsa fout feil fel
    inkorrekt inkorrekte verkehrt unrichtig ungultig fehlerhaft inexact inexacte errone erronee
    erronea equivocado equivocada scorretto scorretta onjuist onjuiste verkeerd verkeerde galet
    galt felaktig felaktigt uriktig forkert forkerte failed rejected
""".split())
#: Words that, followed by ``of`` and a number after the final equation, name more arithmetic
#: (``the difference of 23 and 5``, ``28 to the power of 5``).
OF_OPERATIONS = frozenset("""
    product products quotient difference differences ratio power powers square squares cube cubes
    root roots half double triple twice reciprocal inverse log logarithm factorial remainder multiple
    multiples exponent percent percentage fraction third quarter average mean max maximum min minimum
""".split())
_UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
          "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
#: The value of a number word, and of a tens word joined to a unit (``thirty-two``, ``thirty two``).
_WORD_VALUE = {w: v for v, w in enumerate(_UNITS)} | {w: 20 + 10 * k for k, w in enumerate(_TENS)} | {
    "hundred": 100, "thousand": 1000, "million": 1000000}
NUMBER_WORDS = frozenset(_WORD_VALUE)
_TENS_UNIT = re.compile(r"[-\u2010\u2011 ]?([A-Za-z]+)\b")  # a unit word if its letters are one of _UNITS[1:10]
#: Marks that deny what they touch: a cross next to the final equation, or anywhere after it (also a
#: ballot box with an X, a saltire, a prohibited sign, a no-entry sign and a thumbs down).
DENIAL_MARKS = ("\u274c\u274e\u2717\u2718\u2716"
                "\u2612\u2613\u2bbd\U0001f5f5\U0001f5f7\U0001f6ab\u26d4\U0001f44e")
#: Symbols that read as an operation though they are not Unicode math symbols: the dot and crosses,
#: and the other forms of ``* / % ^ \\ -`` (full-width ``\uff0a \uff0f \uff05 \uff3e``, small
#: ``\ufe61 \ufe6a``, the low asterisk ``\u204e``, Arabic ``\u066d \u066a``, per mille ``\u2030``,
#: modifier ``\u02d6 \u02d7``, the caret ``\u2038``), which read as their ASCII operators.
_OPERATOR_SYMBOLS = ("\u00b7\u2715\u2716\u2795\u2796\u2797"
                     "\uff0a\uff0f\uff05\uff3e\uff3c\uff0d\ufe61\ufe6a\ufe68\ufe63\u204e\u066d\u066a"
                     "\u2030\u2031\u0609\u060a\u02d6\u02d7\u2038")


_RUN = re.compile(r"[0-9+\-*/()= \t]+")
_HAS_DIGIT = re.compile(r"[0-9]")
_HAS_OP = re.compile(r"[+\-*/=]")
_SPACE = " \t"
_WORD_PARENS = "()"  # read past by the word windows around the answer
_DISALLOWED_ASCII = frozenset("^%|~\\[]{}<>")
_SENTENCE = frozenset(".,;:!?\"'\u201c\u201d\u2018\u2019\u00ab\u00bb")
_DECORATION = "_'\u2019*\"`"  # quotes and Markdown emphasis around a word
_QUOTES = "'\"`\u2018\u2019\u201c\u201d"
_CUE_PUNCT = frozenset(":,;\"'*`([$\u201c\u201d\u2018")  # between an answer cue and its number
_LINK_PUNCT = frozenset(",:;(\"'\u2019\u201c\u201d*_`$")
_EXPR_CHARS = re.compile(r"[0-9+\-*/() ]*")
_INT = re.compile(r"[0-9]+")
_VALUE = re.compile(r"-?[0-9]+")
_WS = re.compile(r"\s")
_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_MAX_WORD = 32  # listed words are short; reading a longer word stops there
_LINE_BREAKS = "\n\r\u2028\u2029\x85"
_BLANKS = "\u2800\u3164\u115f\u1160\uffa0"  # characters that print as nothing
#: Other forms of ``?`` (full-width, small, vertical, emoji, ``\u2047 \u2048 \u2049 \u203d``, Arabic,
#: reversed) and of ``!`` (full-width, small, vertical): read as ``?`` and ``!``, so that ``5 + 23 =
#: 28\uff1f`` and ``5 + 23 = 28, right\u2753`` are questions as with ``?``.
QUESTION_MARKS = "\uff1f\ufe56\ufe16\u2753\u2754\u2047\u2048\u2049\u203d\u061f\u2e2e"
EXCLAMATION_MARKS = "\uff01\ufe57\ufe15"
_BIDI = re.compile("[\u202a-\u202e\u2066-\u2069]")
_NON_ASCII_OR_CONTROL = re.compile(r"[^\x20-\x7e\n]")
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9_-]{0,20}>")
# (ASCII letters in any case only: Unicode case folding would read "\u017f" as "s", "\u212a" as "k")
_LATER_TAG = re.compile(r"(?ai)(?:<|&lt;|\uff1c)\s*/?\s*answer|answer\s*(?:>|&gt;|\uff1e)")
_STRUCK_TAG = re.compile(r"(?ai)<(/?)(del|s|strike)>")
# A character overlaid with marks (Unicode's overlay marks, canonical combining class 1), with
# the marks on it: struck through by a stroke (U+0335, U+0336) it is not read; under any other
# overlay (a solidus, U+0338: ``=\u0338`` shows as ``\u2260``; a double solidus, a vertical line,
# a tilde, a ring, and the enclosing circle backslash U+20E0, a prohibition sign over it: ``=\u20e0``)
# it is no longer itself and reads as ``\u2260``.
OVERLAY_MARKS = ("\u0334-\u0338\u1cd4\u1ce2-\u1ce8\u20d2\u20d3\u20d8-\u20da\u20e0\u20e5\u20e6\u20ea\u20eb"
                 "\U00010a39\U00016af0-\U00016af4\U0001bc9e\U0001d167-\U0001d169")
_OVERLAY_MARK = re.compile(f"[{OVERLAY_MARKS}]")
_OVERLAID = re.compile(f"[^{OVERLAY_MARKS}\n\r\u2028\u2029\x85]?[{OVERLAY_MARKS}]+")
_STROKE_ONLY = re.compile("[\u0335\u0336]+")
_BOXED = re.compile(r"\\boxed\{([^{}\n]*)\}")
_LATEX_DELIMITERS = re.compile(r"\\[()\[\]]")
# display math over lines: a "\[" that ends its line and a "\]" that starts one read as "$$", which
# a person sees opening and closing a block around the equation (``If \[`` on the line before it)
_DISPLAY_OPEN = re.compile(r"\\\[(?=[ \t]*(?:\n|$))")
_DISPLAY_CLOSE = re.compile(r"(?m)^([ \t]*)\\\]")
# LaTeX's multiplication and division signs read as the ASCII ones (``25 \\times 4``, ``3 \\cdot 5``,
# ``56 \\div 28``) and its sized parentheses as parentheses (``\\left( ... \\right)``); a longer
# command (``\\cdots``, ``\\timesx``) is none of them, and ``\\frac`` stays another operation; its
# spaces (``\\, \\: \\; \\! \\quad \\qquad \\enspace \\thinspace ...``) and style switches
# (``\\displaystyle``, ``\\textstyle``), which show nothing, read as a space, so nothing before
# them is hidden (``$\\text{wrong} \\; 25 \\times 4 - 3 = 97$``: the ``;`` is no clause mark;
# ``Wrong: $\\displaystyle 25 \\times 4 - 3 = 97$``, ``2 \\times $\\displaystyle ...$``)
_LATEX_OPERATOR = re.compile(r"\\(?:(times|cdot|div)(?![A-Za-z])|left\(|right\)|([,:;!]|(?:q?quad|displaystyle|textstyle"
                             r"|scriptstyle|scriptscriptstyle|(?:neg)?(?:thin|med|thick)space|enspace)(?![A-Za-z])))")


def _read_latex_operator(text: str, m: re.Match) -> str:
    """The sign a LaTeX command reads as: a ``\\times``, ``\\cdot`` or ``\\div`` only after an operand
    (a digit, ``)`` or ``}``, blanks apart), where it joins two; anywhere else (``\\cdot 5 + 23``
    opening a line, which would read as a list bullet) it stays the command, an operator word."""
    if m.group(2) is not None:
        return " "  # a LaTeX space or style switch (\\; \\quad \\displaystyle): not a semicolon, no word
    name = m.group(1)
    if name is None:
        return m.group()[-1]  # \left( or \right)
    k = m.start() - 1
    while k >= 0 and text[k] in _SPACE:
        k -= 1
    if k < 0 or not (text[k] in "0123456789)}"):
        return m.group()
    return " / " if name == "div" else " * "


class _Reject(Exception):
    pass


# ---------------------------------------------------------------------------------------
# reading the text as a person sees it (without tags)
# ---------------------------------------------------------------------------------------
def _visible(ch: str) -> str:
    if ch in _LINE_BREAKS:
        return "\n"
    if ch in QUESTION_MARKS or ch in EXCLAMATION_MARKS:
        return "?" if ch in QUESTION_MARKS else "!"
    if ch.isspace() or ch in _BLANKS:
        return " "
    if unicodedata.category(ch) in ("Cf", "Cc", "Mn", "Me"):
        return ""  # invisible, or a mark on the character before it
    return ch


def _read_tag(m: re.Match) -> str:
    """A tag reads as a space, but superscript and subscript (``26<sup>2</sup>``) as ``^``: the
    text in them is raised or lowered, another operation than the one written."""
    return "^" if m.group().lower() in _RAISED_TAGS else " "


_RAISED_TAGS = frozenset(("<sup>", "</sup>", "<sub>", "</sub>"))


def _read_overlaid(m: re.Match) -> str:
    marks = m.group() if _OVERLAY_MARK.match(m.group()) else m.group()[1:]
    return "" if _STROKE_ONLY.fullmatch(marks) else "\u2260"


def _struck_spans(text: str):
    """``(start, inner end, end)`` of each struck-through span: a ``<del>``, ``<s>`` or ``<strike>``
    up to its closing tag (an unclosed one is left to the tag rule). One pass over the tags."""
    opened = None
    for m in _STRUCK_TAG.finditer(text):
        closing, name = m.group(1), m.group(2).lower()
        if opened is None:
            if not closing:
                opened = (m.start(), name)
        elif closing and name == opened[1]:
            yield opened[0], m.start(), m.end()
            opened = None


def _unstruck(text: str) -> str:
    """``text`` with each struck-through span (:func:`_struck_spans`) a space."""
    out, pos = [], 0
    for start, _, end in _struck_spans(text):
        out += [text[pos:start], " "]
        pos = end
    return "".join(out) + text[pos:]


def _struck_over(text: str, start: int, end: int) -> bool:
    """Whether a struck-through span (:func:`_struck_spans`) opens before ``start`` and closes at
    or after ``end``: what lies between is struck through."""
    return any(s < start and inner >= end for s, inner, _ in _struck_spans(text))


def _without_thematic_breaks(text: str) -> str:
    """``text`` (read by :func:`normalise`) with each Markdown thematic break blanked: a line of
    three or more of the same ``-``, ``*`` or ``_`` and blanks alone (``---``, ``* * *``), a divider
    a person reads as a rule, not as an operator ending the line (``5 + 23 = 28`` then ``---``, or
    ``---`` above an answer). A whole line only: with tags it is read with the block in place, so
    marks on the block's own line (``---<answer>``) stay next to it. Dashes alone (no blank among
    them) right under a line of text are that line's underline, a setext heading: it reads as a
    ``#`` heading, so a denial there is one (``This answer is definitely wrong`` then ``---``)."""
    lines = text.split("\n")
    for k, line in enumerate(lines):
        if len(line) >= 3 and line.lstrip(" \t")[:1] in ("-", "*", "_"):
            marks = line.replace(" ", "").replace("\t", "")
            if len(marks) >= 3 and marks == marks[0] * len(marks):
                lines[k] = ""
                # dashes alone right under a line of text underline it: a Markdown (setext) heading,
                # read as one (``This answer is wrong`` then ``---``: ``# This answer is wrong``)
                above = lines[k - 1] if k > 0 else ""
                if (marks[0] == "-" and "-" * len(marks) == line.strip(" \t") and above.strip(" \t")
                        and "\0" not in above and not above.lstrip(" \t").startswith("#")):
                    lines[k - 1] = "# " + above
    return "\n".join(lines)


def normalise(text: str) -> tuple[str | None, str]:
    """``(text as a person reads it, "")``, or ``(None, reason)`` (see the module docstring)."""
    if _BIDI.search(text):
        return None, "bidirectional control characters"
    text = text.replace("\r\n", "\n")  # one line break, as Markdown reads it (``Text`` CRLF ``---``: a heading)
    if "&" in text:
        text = html.unescape(text)
    if _OVERLAY_MARK.search(text):
        text = _OVERLAID.sub(_read_overlaid, text)
    if "<" in text:
        text = _unstruck(text)
    text = _NON_ASCII_OR_CONTROL.sub(lambda m: _visible(m.group()), text)
    text = text.replace("<answer>", " answer ").replace("</answer>", " ")
    text = _TAG.sub(_read_tag, text)
    if "\\" in text:
        text = _BOXED.sub(lambda m: " answer " + m.group(1) + " ", text)
        text = _LATEX_OPERATOR.sub(lambda m: _read_latex_operator(text, m), text)
        text = _DISPLAY_CLOSE.sub(r"\1$$", _DISPLAY_OPEN.sub("$$", text))
        text = _LATEX_DELIMITERS.sub(" ", text)
    return text, ""


# ---------------------------------------------------------------------------------------
# tokens next to the equation
# ---------------------------------------------------------------------------------------
def extract_answer(text: str) -> str | None:
    """The content of the last complete ``<answer>...</answer>`` block, or None. Linear time."""
    end = text.rfind("</answer>")
    if end < 0:
        return None
    start = text.rfind("<answer>", 0, end)
    if start < 0:
        return None
    return text[start + len("<answer>"): end]


def _is_letter(ch: str) -> bool:
    return ch.isalpha() or ch == "_"


def _wordish(ch: str) -> bool:
    return ch.isalpha() or ch in _DECORATION


def _token(text: str, i: int, step: int) -> tuple[str | None, str, int]:
    """The token whose first character in reading direction ``step`` is at ``i`` (spaces and tabs
    skipped first): ``("word", lower-cased word without quotes or emphasis, next index)``,
    ``("skip", "", next)`` for bare quotes or emphasis, ``("number", text, next)`` for digits
    (with ``. , % /`` inside), or ``(None, "", i)`` for anything else, a line end or a word longer
    than any listed word."""
    size = len(text)
    while 0 <= i < size and text[i] in _SPACE:
        i += step
    if not 0 <= i < size:
        return None, "", i
    j, ch = i, text[i]
    if _wordish(ch):
        while 0 <= j < size and _wordish(text[j]) and abs(j - i) <= _MAX_WORD + 1:
            j += step
        if abs(j - i) > _MAX_WORD + 1:
            return None, "", i
        word = (text[i:j] if step > 0 else text[j + 1: i + 1]).strip(_DECORATION)
        return ("word" if word else "skip"), word.replace("\u2019", "'").lower(), j
    if ch.isnumeric() or (ch == "%" and 0 <= i + step < size and text[i + step].isnumeric()):
        while 0 <= j < size and abs(j - i) <= 64:
            c = text[j]
            if c.isnumeric() or c == "%" or (c in ".,/" and text[j + step: j + step + 1].isnumeric()
                                             and 0 <= j + step < size):
                j += step
            else:
                break
        return "number", text[min(i, j - step): max(i, j - step) + 1], j
    return None, "", i


def _words_problem(text: str, start: int, end: int) -> str | None:
    """An operator word or negation among the four words on each side of ``text[start:end]``, or
    ``of``, ``by``, ``to``, ``from`` or ``for`` right after a number just before it (``add 3 to 26 + 24``).
    A LaTeX command's name is read as a word (``\\sqrt``, ``\\neg``) but is none of the four: the
    window reads on past it (``Not \\mathbf so 5 + 23 = 28``), as past TeX's ``$``."""
    for pos, step in ((start - 1, -1), (end, +1)):
        words, tokens, i = [], 0, pos
        command = False  # (reading forward: the next word is a LaTeX command's name)
        while len(words) < 4 and tokens < 8:
            at = i
            kind, value, i = _token(text, i, step)
            tokens += 1
            if kind is None and 0 <= i < len(text) and (text[i] in _WORD_PARENS or text[i] in "${}[]"):
                # a parenthesis around words ("(wrong) <answer>...", "If (hypothetically) 5 + 23"), TeX's
                # "$", which shows nothing ("If $\\huge so 5 + 23 = 28$"), or a LaTeX group or bracket around
                # words ("\\text{Wrong} is 5 + 23 = 28", "[Not] so ...")
                i += step
                continue
            if kind is None and 0 <= i < len(text) and text[i] == "\\" and _ASCII_LETTER.match(text, i + 1):
                # a LaTeX command: its name, read (backwards) or to read (forwards), is no word of the window
                if step < 0 and words:
                    words.pop()
                    tokens -= 2
                elif step > 0:
                    command, tokens = True, tokens - 1
                i += step
                continue
            if kind == "skip":
                continue
            if kind == "number":
                if step < 0 and words in (["of"], ["by"], ["to"], ["from"], ["for"]):
                    return f"'{value} {words[0]}' before the equation"
                break
            if kind is None:
                break
            if not value.isascii():
                return f"a word in another alphabet next to the equation ({value!r})"
            if step < 0 and words == ["of"] and value in NUMBER_WORDS:
                return f"'{value} of' before the equation"
            if value in OPERATOR_WORDS:
                return f"the word {value!r} next to the equation"
            if value in NEGATIONS and not _prefix_non(value, text, i if step > 0 else at + 1):
                return f"the equation is denied ({value!r} next to it)"
            if step < 0 and value in HYPOTHETICALS:
                return f"the equation is a supposition ({value!r} before it)"
            if command:
                command, tokens = False, tokens - 1
                continue
            words.append(value)
    return None


def _number_after(text: str, i: int, *, strict: bool) -> tuple[str | None, bool]:
    """A number reached from ``i`` over up to six linking words (:data:`RESULT_LINKS`, negations,
    quotes, commas, colons): ``(number, negated)``, ``("not an integer", negated)`` for a number
    that is not a plain integer or (``strict``) a symbol or number word in its place, or
    ``(None, False)``."""
    negated, links = False, 0
    while True:
        while 0 <= i < len(text) and (text[i] in _SPACE or text[i] in _LINK_PUNCT):
            i += 1
        if not 0 <= i < len(text):
            return None, False
        ch = text[i]
        if ch.isnumeric():
            kind, value, j = _token(text, i, +1)
            nxt = text[j: j + 1]
            if not (value.isascii() and value.isdigit()) or (nxt and (_is_letter(nxt) or nxt.isnumeric())):
                return "not an integer", negated
            return value, negated
        if strict and (ch in _DISALLOWED_ASCII or unicodedata.category(ch) == "Sm"):
            return "not an integer", negated
        kind, value, j = _token(text, i, +1)
        if kind != "word" or links >= 6:
            return None, False
        if value in NUMBER_WORDS:
            return ("not an integer", negated) if strict else (None, False)
        if value not in RESULT_LINKS and value not in NEGATIONS:
            return None, False
        negated |= value in NEGATIONS
        links += 1
        i = j


_FENCES = ("```", "~~~", "$$")  # closing a block on the line after the final equation
_REST_TOKEN = re.compile(r"[0-9]+|[A-Za-z]+(?:['\u2019][A-Za-z]+)?|####|\S")
_TAKE = frozenset("take takes took taking taken".split())
_NESTED_BRACE = re.compile(r"\{[^{}]*\{")


class _LatinBase(dict):
    """A ``str.translate`` table: a Latin letter with diacritics to its ASCII letter (``ã`` ``a``,
    ``ó`` ``o``, ``ä`` ``a``), and a compatibility form of one to that letter (full-width ``Ｎ``,
    mathematical ``𝐍``, circled ``ⓝ``), one character for one, so positions stay; anything else
    kept."""

    def __missing__(self, code: int) -> int:
        c = chr(code)
        base = [b for b in unicodedata.normalize("NFKD", c) if not unicodedata.combining(b)]
        letter = len(base) == 1 and base[0].isascii() and base[0].isalpha() and not c.isnumeric()
        self[code] = ord(base[0]) if letter else code  # (a Roman numeral "ⅰ" stays a number)
        return self[code]


_LATIN_BASE = _LatinBase()


def _other_alphabet(c: str) -> bool:
    """Whether the character ``c`` is a letter of another alphabet than Latin (Cyrillic, Greek,
    CJK, ...), whose denials are not read; Latin letters with diacritics are Latin."""
    return c.isalpha() and not c.isascii() and "LATIN" not in unicodedata.name(c, "")


_ASCII_LETTERS = re.compile(r"[A-Za-z]+")
_ASCII_LETTER = re.compile(r"[A-Za-z]")


def _glued_denial(raw: str, at: int) -> bool:
    """A denial whose letters a letter with diacritics follows (``wrongé``, ``Notä``): read as the
    word it starts with, as it reads without the folding."""
    w = _ASCII_LETTERS.match(raw, at)
    return (w is not None and w.end() < len(raw) and not raw[w.end()].isascii()
            and (w.group().lower() in NEGATIONS or w.group().lower() in AFTER_DENIALS)
            and not _prefix_non(w.group(), raw, w.end()))  # ("non\u2011negative": a prefix)


def _prefix_non(word: str, text: str, end: int) -> bool:
    """``non`` ending at ``end`` and joined by a hyphen to the word after it (``non-negative``): a
    prefix, not the negation ("Non è corretto")."""
    return (word.lower() == "non" and text[end: end + 1] in ("-", "\u2010", "\u2011")
            and text[end + 1: end + 2].translate(_LATIN_BASE).isalpha())  # (a letter, or a form of one: "ⓝ")


def _after_problem(text: str, end: int, nums: list[int], target: int, linked: int = 0) -> str | None:
    """What after the final equation (from ``end``) changes or contradicts it: a number that is
    neither a given number nor the target (``The answer is 48``, ``50 minus 2``), a number after an
    answer cue that is not the target (``The answer is 24``) or, after one of :data:`SENTENCE_CUES`,
    anywhere in the rest of its sentence (``The answer is therefore 24``), a decimal (``50.5``), a
    number in another script, a number next to an operator sign or word (``26 \u2212 24``, ``26 take
    away 24``) or after an operator word and ``of`` (``the product of 26 and 24``), LaTeX
    ``\\frac``, ``\\div`` or a ``\\boxed{}`` holding braces, a number word after an answer cue
    (``the answer is forty-eight``), a number word whose value is not the target after a cue in its
    sentence, after a word that states a result (``, or eighteen``, ``which is five``, ``(two)``)
    or when it is 10 or more and not a given number (``thirty-two``), a negation, denial or cross
    mark (``..., is indeed wrong``, ``The answer is not 13``, ``I made an error``, ``Scratch that``,
    ``\u274c``), more arithmetic on the result (``Then double it``, ``I multiplied 12 by ...``), or
    an unfinished operation at the very end of the text (``... +``, ``Then I added``). One pass over
    the rest of the text."""
    raw = text
    if not text.isascii():  # words read without their diacritics ("Não", "erróneo", "är")
        text = text[:end] + text[end:].translate(_LATIN_BASE)
    allowed = {str(n) for n in nums} | {str(target)}
    prev: list[tuple[str, str]] = []  # (kind, value) of the tokens read so far
    plain: list[tuple[str, str]] = []  # (the same, emphasis and quotes left out: a subject's words)
    cue_sentence = False  # one of SENTENCE_CUES came earlier in the current sentence and line
    own_sentence = True  # still in the final equation's sentence and line, within four words of it
    eq_sentence = True  # still in the final equation's sentence and line, at any distance
    tag_words = -1  # words since the last clause mark (, ; or a dash) in that sentence; -1: none yet
    words_after = -linked  # (the words linking a result written in words: "5 + 23 gives us 28, is it?")
    gap_from, unit_until = end, -1
    for m in _REST_TOKEN.finditer(text, end):
        tok = m.group()
        if (any(c in _LINE_BREAKS for c in text[gap_from:m.start()]) and not text.startswith(_FENCES, m.start())
                and tok != ","):
            # (a code fence or "$$" closing its block goes on with it, as does a comma opening the line)
            cue_sentence = own_sentence = eq_sentence = False
        gap_from = m.end()
        if tok[0] in "0123456789":
            kind = "number"
            if tok not in allowed:
                return f"a number after the final equation ({tok[:12]}) is neither a given number nor the target"
            if tok != str(target) and (cue_sentence or _after_cue(prev)):
                return f"a later answer ({tok}) is not the target {target}"
            if tok != str(target) and _stated(prev, parenthesis=False):
                return f"a later result ({tok}) is not the target {target} (after {prev[-1][1]!r})"
            if text[m.end(): m.end() + 1] == "." and text[m.end() + 1: m.end() + 2].isdigit():
                return f"a decimal number after the final equation ({tok}.)"
            if text[m.start() - 1: m.start()] == "." and not (m.start() > 1 and (text[m.start() - 2].isalnum()
                                                                                   or text[m.start() - 2] == ".")):
                return f"a decimal number after the final equation (.{tok})"  # (past a tag or "$": "</code>.5")
            if (text[m.end(): m.end() + 1] == "," and text[m.end() + 1: m.end() + 2].isdigit()
                    and (cue_sentence or _after_cue(prev))):
                return f"a decimal comma in a later answer ({tok},)"
            if _of_operation(prev):
                return f"more arithmetic after the final equation ({prev[-2][1]!r} of {tok})"
        elif tok.isnumeric():
            return f"a number in another script after the final equation ({tok!r})"
        elif tok == "####":
            kind = "word"
        elif _other_alphabet(tok):
            # (its denials are not read: "5 + 23 = 28. \u041d\u0435\u0432\u0435\u0440\u043d\u043e.")
            return f"a word in another alphabet after the final equation ({tok!r})"
        elif tok[0].isascii() and tok[0].isalpha():
            kind, tok = "word", tok.lower().replace("\u2019", "'")
            words_after += 1
            tag_words += tag_words >= 0
            own_sentence = own_sentence and words_after <= 4
            if (tok in NEGATIONS and not _prefix_non(tok, text, m.end())) or tok in AFTER_DENIALS \
                    or (tok in _TAKEN_BACK and prev[-1:] and prev[-1][0] == "word" and prev[-1][1] in _TAKE_BACK) \
                    or (tok == "back" and prev[-2:] == [("word", "take"), ("word", "it")]) \
                    or (prev[-1:] and prev[-1][0] == "word" and (prev[-1][1], tok) in DENIAL_PAIRS) \
                    or (raw is not text and _glued_denial(raw, m.start())):
                return f"a denial after the final equation ({tok!r})"
            if tok in RESULT_OBJECTS and any(k == "word" and v in ARITHMETIC_ACTIONS for k, v in prev[-5:]):
                return f"more arithmetic on the result after the final equation ({tok!r})"
            if tok in NUMBER_WORDS and _after_cue(prev):
                return f"an answer written as a word after the final equation ({tok!r})"
            if tok == "away" and prev and prev[-1][1] in _TAKE:
                tok = "take away"  # an operator phrase
            if tok in ("frac", "dfrac", "tfrac", "div") and prev[-1:] == [("other", "\\")]:
                return f"LaTeX \\{tok} after the final equation"
            if tok == "boxed" and prev[-1:] == [("other", "\\")] and _NESTED_BRACE.match(text, m.end()):
                return "a \\boxed{} holding braces after the final equation"
            if tok in _WORD_VALUE and _word_operation(prev):
                return f"more arithmetic after the final equation (a number word, {tok!r}, after {prev[-1][1]!r})"
            if tok in _WORD_VALUE and m.start() >= unit_until:
                value = _WORD_VALUE[tok]
                unit = _TENS_UNIT.match(text, m.end()) if tok in _TENS else None
                if unit and unit.group(1).lower() in _UNITS[1:10]:
                    value, unit_until = value + _WORD_VALUE[unit.group(1).lower()], unit.end()
                if value != target and (cue_sentence or _stated(prev) or _of_operation(prev)
                                        or (value >= 10 and value not in nums)):
                    return f"a number written as a word after the final equation ({tok!r}) is not the target"
        elif tok in DENIAL_MARKS:
            return f"a denial after the final equation ({tok!r})"
        elif tok == "?" and own_sentence:
            return "the equation is a question (a '?' within four words after it)"
        elif tok == "?" and eq_sentence and 0 < tag_words <= 3:
            return "the equation is a question (a tag question ends its sentence: ', right?')"
        elif tok == "?" and _doubt(prev):
            return "a denial after the final equation ('Or is it?')"
        else:
            kind = ("sign" if (tok in "^%~/" or tok in _OPERATOR_SYMBOLS or unicodedata.category(tok) in ("Sm", "Pd")
                              or (tok == "*" and text[m.start() - 1: m.start()].isspace()
                                  and text[m.end(): m.end() + 1].isspace() and not _bullet(text, m.start())))
                    else "other")  # (" * ": no emphasis; a "* " that starts its line is a bullet)
        if prev and {kind, prev[-1][0]} == {"number", "sign"}:
            return "more arithmetic after the final equation"
        if prev and {kind, prev[-1][0]} == {"number", "word"}:
            word = tok if kind == "word" else prev[-1][1]
            if word in OPERATOR_WORDS or word == "take away":
                return f"more arithmetic after the final equation ({word!r})"
        if kind == "number" and any(k == "word" and v in ARITHMETIC_ACTIONS for k, v in prev[-3:]):
            return "more arithmetic after the final equation (a number just after an operation word)"
        if kind == "word" and tok in SENTENCE_CUES:
            subject = _answer_subject(plain)
            if subject is not None and subject != str(target):
                return f"a later answer ({subject}) is not the target {target}"
            cue_sentence = True
        elif tok in ".!?" and not (tok != "?" and text[m.end(): m.end() + 1] in (".", "!", "?")) \
                and not (tok == "." and text[m.start() - 1: m.start()] == "."):
            # (the last mark of a run ends it, "!?" and "...?" ask; an ellipsis, "...", is a pause, as "\u2026")
            cue_sentence = own_sentence = eq_sentence = False
        if eq_sentence and (tok in TAG_MARKS or (tok == "." and "." in (text[m.start() - 1: m.start()],
                                                                           text[m.end(): m.end() + 1]))
                            or (tok == "-" and text[m.start() - 1: m.start()] in (" ", "\t", "-"))):
            tag_words = 0  # (an ellipsis too: "... is what I get... right?")
        if tok not in _DECORATION and tok not in _QUOTES and tok != "$":  # (also " * ", and TeX's $)
            plain.append((kind, tok))
            if len(plain) > 8:
                del plain[0]
        prev.append((kind, tok))
        if len(prev) > 8:
            del prev[0]
    if prev and (prev[-1][0] == "sign" or prev[-1][1] in ("*", "/")):
        return "the text ends in an unfinished operation"
    if prev and prev[-1][0] == "word" and (prev[-1][1] in ARITHMETIC_ACTIONS or prev[-1][1] in OPERATOR_WORDS):
        return f"the text ends in an unfinished operation ({prev[-1][1]!r})"
    return None


#: Marks after which up to three words and a ``?`` ending the final equation's sentence are a tag
#: question, at any distance from it (``25 * 4 - 3 = 97 is my final answer, right?``, ``...: right?``,
#: ``... (right?)``); an ellipsis (``...``) is one too, and an ASCII dash after a blank or a dash
#: (``... -- right?``, ``... - right?``).
TAG_MARKS = frozenset(",;:(\u2013\u2014\u2026")
#: Operator words that apply a number word right after them to what came before (``Then times
#: two.``, ``minus five``, ``less five``); ``divided`` and ``multiplied`` with ``by`` between
#: (``divided by two``).
WORD_OPERATIONS = frozenset("times plus minus less".split())
_BY_OPERATIONS = frozenset("divided multiplied".split())


def _word_operation(prev: list[tuple[str, str]]) -> bool:
    """Whether the tokens just read end in one of :data:`WORD_OPERATIONS`, or ``divided by`` /
    ``multiplied by``: a number word next is an operand (digits there are caught as next to an
    operator word)."""
    if prev and prev[-1][0] == "word" and prev[-1][1] in WORD_OPERATIONS:
        return True
    return (len(prev) >= 2 and prev[-1] == ("word", "by") and prev[-2][0] == "word"
            and prev[-2][1] in _BY_OPERATIONS)


def _doubt(prev: list[tuple[str, str]]) -> bool:
    """Whether the tokens just read, before a ``?``, end in ``or is it`` (``was``, ``that``,
    ``this``): a question that doubts the final equation."""
    return (len(prev) >= 3 and prev[-3] == ("word", "or") and prev[-2] in (("word", "is"), ("word", "was"))
            and prev[-1] in (("word", "it"), ("word", "that"), ("word", "this")))


def _of_operation(prev: list[tuple[str, str]]) -> bool:
    """Whether the tokens just read end in an operator word and ``of`` (``the product of``)."""
    return len(prev) >= 2 and prev[-1] == ("word", "of") and prev[-2][0] == "word" and prev[-2][1] in OF_OPERATIONS


def _stated(prev: list[tuple[str, str]], parenthesis: bool = True) -> bool:
    """Whether the tokens just read (quotes, emphasis and commas aside) end in ``(`` (only with
    ``parenthesis``: a number word there, ``(eighteen)``, states a value; digits there name the
    numbers used, ``(5 and 23 once each)``), one of :data:`STATING_WORDS`, or ``is`` / ``was`` /
    ``be`` after one of :data:`_STATING`, one of :data:`HEDGES` apart (``or maybe``)."""
    words: list[str] = []
    for kind, value in reversed(prev):
        if kind == "other" and value in ",\"'*_`\u201c\u201d":
            continue
        if kind == "other" and value == "(" and not words:
            return parenthesis
        if kind != "word":
            break
        words.append(value)
        if len(words) == 3:
            break
    if words and words[0] in HEDGES:
        del words[0]
    if not words:
        return False
    return words[0] in STATING_WORDS or (words[0] in ("is", "was", "be") and words[1:] != [] and words[1] in _STATING)


def _answer_subject(prev: list[tuple[str, str]]) -> str | None:
    """The number the tokens just read (Markdown emphasis, quotes and ``$`` left out) make an answer
    before its cue word (``24 is the final`` before ``answer``), or None."""
    verb, fillers = False, 0
    for kind, value in reversed(prev):
        if kind == "number":
            return value if verb else None
        if kind == "word" and value in _SUBJECT_VERBS and not verb:
            verb, fillers = True, 0
        elif kind == "word" and value in _SUBJECT_FILLERS and fillers < (2 if verb else 4):
            fillers += 1
        else:
            return None
    return None


def _after_cue(prev: list[tuple[str, str]]) -> bool:
    """Whether the tokens just read end in an answer cue followed only by linking words and
    punctuation (``answer is:``)."""
    for kind, value in reversed(prev):
        if kind == "word" and value in ANSWER_CUES:
            return True
        if not ((kind == "word" and value in RESULT_LINKS) or (kind == "other" and value in _CUE_PUNCT)):
            return False
    return False


# ---------------------------------------------------------------------------------------
# the final equation
# ---------------------------------------------------------------------------------------
def _beyond(text: str, pos: int, step: int) -> str:
    """The first character after ``pos`` in direction ``step`` that is not a space or tab ("" at
    the end of the text)."""
    i = pos + step
    while 0 <= i < len(text) and text[i] in _SPACE:
        i += step
    return text[i] if 0 <= i < len(text) else ""


def _neighbour_problem(text: str, pos: int, glued: bool, after: bool, written: bool) -> str | None:
    """Why the character at ``pos`` (just outside the final equation's run, on its right when
    ``after``) changes the equation's meaning, or None when it is harmless prose. ``written``: the
    equation ends in a written result (``= 7``), after which ``!`` is an exclamation."""
    if pos < 0 or pos >= len(text) or (not after and _list_bullet(text, pos)):  # (- <answer>...: a list item)
        return None
    ch = text[pos]
    if ch.isspace():  # a line break: the equation's line ends here
        return None
    if _is_letter(ch):
        if not glued and not after and _applied_variable(text, pos, "("):
            return f"a function or variable applied to the equation ({ch!r} before its parenthesis)"
        return f"letters glued to the equation ({ch!r})" if glued else None
    if ch.isdigit() or ch.isnumeric():
        return f"a number sign the task does not allow next to the equation ({ch!r})"
    if ch in _DISALLOWED_ASCII:
        kind = "a bracket" if ch in "[]{}" else "an operator"
        return f"{kind} the task does not allow next to the equation ({ch!r})"
    if ch in DENIAL_MARKS:
        return f"the equation is denied (a cross mark {ch!r} next to it)"
    if ch == "?" and after:
        return "the equation is a question ('?' after it)"
    cat = unicodedata.category(ch)
    if cat == "Sm" or ch in _OPERATOR_SYMBOLS:
        return f"a math symbol the task does not allow next to the equation ({ch!r})"
    if ch == "!" and after and text[pos + 1: pos + 2] == "=":
        return "the equation is denied ('!=' after it)"
    if ch == "!" and (after or glued) and not (after and written):
        return "a '!' next to the equation"
    if ch in ".," and glued and text[pos + 1: pos + 2].isdigit():
        return f"a decimal point or digit grouping ({ch!r}) in a number of the equation"
    beyond = _beyond(text, pos, 1 if after else -1)
    if cat == "Pd" and not after and (glued or not _is_letter(beyond)):
        return f"a dash before the equation ({ch!r})"
    if (ch not in _SENTENCE and beyond and (beyond.isnumeric() or beyond in "+-*/=()" or beyond in _DISALLOWED_ASCII
                                            or unicodedata.category(beyond) == "Sm")
            and not (beyond in "-*+" and not after and _list_bullet(text, text.rindex(beyond, 0, pos)))):
        return f"a symbol between the equation and more arithmetic ({ch!r})"  # (- $5 + 23 = 28$: a bullet)
    if ch in "+*/" and _operand_beyond(text, pos, 1 if after else -1):
        return f"an operation on the equation ({ch!r} and a number or variable past it)"
    if cat == "Pd" and _variable_beyond(text, pos, 1 if after else -1):
        return f"an operation on the equation ({ch!r} and a variable past it)"
    return None


def _applied_variable(text: str, pos: int, opening: str) -> bool:
    """Whether the letter at ``pos`` is a one-letter variable (an ASCII letter alone, not the words
    ``a``, ``A``, ``I``) and what follows it, blanks and wrapper symbols apart, starts with
    ``opening``: ``f (25 * 4 - 3) = 97`` applies a function ``f`` (or multiplies by ``f``), as
    ``f(25 * 4 - 3)`` does; the expression is an argument, not the answer."""
    ch = text[pos]
    if not (ch.isascii() and ch.isalpha()) or ch in "aAI" or (pos > 0 and (text[pos - 1].isalnum()
                                                                          or text[pos - 1] in "_'\u2019\\")):
        return False
    i = pos + 1
    while i < len(text):
        if text[i] in _SPACE or _wrapper(text[i]):
            i += 1
        elif text[i] == "\\" and _ASCII_LETTER.match(text, i + 1):  # a LaTeX command, read past ("f \\bf (...)")
            j = i + 1
            while j < len(text) and text[j].isascii() and text[j].isalpha():
                j += 1
            if text[i + 1:j].lower() in _LATEX_WORDS:
                return False
            i = j
        else:
            break
    return text.startswith(opening, i)


def _bullet(text: str, pos: int) -> bool:
    """Whether the character at ``pos`` starts its line (blanks apart): a list bullet."""
    i = pos - 1
    while i >= 0 and text[i] in _SPACE:
        i -= 1
    return i < 0 or text[i] == "\n"


def _bullet_blank(text: str, pos: int) -> bool:
    """Whether the mark at ``pos`` that starts its line can be a bullet: a ``*`` or ``>`` (also
    emphasis or a quote mark), or a ``-`` or ``+`` with a blank after it; glued to what follows
    (``-\\bf 25 * 4 - 3 = 97``, a LaTeX command read past) a dash is a minus sign."""
    return text[pos] in "*>" or text[pos + 1: pos + 2] in (" ", "\t")


def _list_bullet(text: str, pos: int) -> bool:
    """Whether the ``-``, ``*`` or ``+`` at ``pos`` is a Markdown list bullet: it starts its line
    and a blank follows it (``- 5 + 23 = 28``; ``-5 + 23`` is a unary minus)."""
    return text[pos] in "-*+" and text[pos + 1: pos + 2] in (" ", "\t") and _bullet(text, pos)


def _operand_beyond(text: str, pos: int, step: int, *, emphasis: bool = False) -> bool:
    """Whether past the operator at ``pos`` (spaces and quotes apart) comes a number, digits, a
    number word or a one-letter variable (``* two``, ``/'2'``, ``two*``, ``n * ``). ``emphasis``:
    past a run of stars that may be emphasis or a power (:func:`_operand_next`), where a bracket
    closing (before) or opening (after) a number is an operand too, and ``a``, ``A``, ``I`` are
    words."""
    i = pos + step
    while 0 <= i < len(text) and (text[i] in _SPACE or text[i] in _QUOTES):
        i += step
    if not 0 <= i < len(text):
        return False
    if emphasis and text[i] in (")]}" if step < 0 else "([{"):  # a bracket around a number, not around prose ("(using both)")
        past = _beyond(text, i, step)
        return past != "" and (past.isnumeric() or past in ")]}([{")
    if text[i].isnumeric():
        return True
    j = i
    while 0 <= j < len(text) and text[j].isascii() and text[j].isalpha():
        j += step
    word = text[i:j] if step > 0 else text[j + 1:i + 1]
    # (one letter: a variable, ``n * ``)
    return word.lower() in _WORD_VALUE or (len(word) == 1 and not (emphasis and word in "aAI"))


def _variable_beyond(text: str, pos: int, step: int) -> bool:
    """Whether past the dash at ``pos`` (spaces and quotes apart) comes a one-letter variable
    (``n - <answer>``); the one-letter words ``a`` and ``I`` are prose (``- I am sure``)."""
    i = pos + step
    while 0 <= i < len(text) and (text[i] in _SPACE or text[i] in _QUOTES):
        i += step
    if not (0 <= i < len(text) and text[i].isascii() and text[i].isalpha() and text[i] not in "aAI"):
        return False
    nxt = text[i + step] if 0 <= i + step < len(text) else ""
    return not nxt or not (nxt.isalnum() or nxt in "'\u2019_")


_STARS = re.compile(r"\*+")
_ASCII_WORD_RUN = re.compile(r"[A-Za-z']+")
_CLAUSE_MARK = re.compile(r"[.!?:;](?=\s)")
_ASCII_WORD = re.compile(r"[A-Za-z]{2}")


_QUOTE_MARKS = re.compile(r"(?m)^[ \t]*>[> \t]*")


def _unquoted(view: str) -> str:
    """``view`` with the Markdown blockquote marks that open its lines (``> ``, ``> > ``, ``>> ``)
    read as blanks: ``> 5 + 23 = 28`` is a quoted line, not a comparison. A ``>`` glued to what
    follows it on the line (``>5``) is left as it is. The start of ``view`` is a line's start."""
    def blank(m: re.Match) -> str:
        marks = m.group()
        if marks.endswith(">") and m.end() < len(view) and not view[m.end()].isspace():
            return marks
        return " " * len(marks)
    return _QUOTE_MARKS.sub(blank, view) if ">" in view else view


def _without_emphasis(view: str) -> str:
    """The text around an answer block (the block one NUL), or the whole text in the final
    equation's mode, without Markdown emphasis: a pair of ``*``, ``**`` or ``***`` on one line
    around words (``**Answer:** <answer>``, ``**Final Answer**`` on the line before, ``**So 5 + 23
    = 28.**``), around the block itself (``**<answer>...</answer>**``) or around a wrapped equation
    (``**$5 + 23 = 28$**``), opening and closing as Markdown's do, with a word inside (two ASCII
    letters together), and with no operand past a marker whose inner side is one (``two **5 + 23 =
    28 is it**``: a power). Read as arithmetic, ``**`` next to the block rejected every such reply.
    Consecutive runs of stars are paired left to right: linear time."""
    runs = list(_STARS.finditer(view))
    out, at, k = [], 0, 0
    while k + 1 < len(runs):
        a, b = runs[k], runs[k + 1]
        if _emphasis_pair(view, a, b):
            out += [view[at:a.start()], view[a.end():b.start()]]
            at, k = b.end(), k + 2
        else:
            k += 1
    out.append(view[at:])
    return "".join(out)


def _emphasis_pair(view: str, opening: re.Match, closing: re.Match) -> bool:
    marker, inner = opening.group(), view[opening.end():closing.start()]
    if len(marker) > 3 or closing.group() != marker or not inner or "\n" in inner:
        return False
    if inner[0].isspace() or inner[-1].isspace():
        return False  # (a marker with a space inside does not open or close emphasis)
    before = view[opening.start() - 1] if opening.start() else ""
    after = view[closing.end()] if closing.end() < len(view) else ""
    if (before and (before.isalnum() or before == "_")) or (after and (after.isalnum() or after == "_")):
        return False  # (2**3**: digits or letters glued outside)
    # a word inside (*n* may be a variable), the answer block, or a wrapped equation: **$5 + 23 = 28$**
    if not (inner == "\0" or _ASCII_WORD.search(inner) is not None
            or (len(inner) > 2 and _wrapper(inner[0]) and _wrapper(inner[-1]))):
        return False
    # ... and no operand on both sides of a marker: it may be the power operator ("n **5 + 23 = 28 is it**",
    # "5 + 23 = 28 **two**": a number word inside is an operand too)
    if (_operand_edge(inner[0]) or _number_word_edge(inner, +1)) and _operand_next(view, opening.start(), -1):
        return False
    return not ((_operand_edge(inner[-1]) or _number_word_edge(inner, -1))
                and _operand_next(view, closing.end() - 1, 1))


def _number_word_edge(inner: str, step: int) -> bool:
    """Whether ``inner`` starts (``step`` 1) or ends (-1) with a number word (``two``, ``Twenty``)."""
    i = 0 if step > 0 else len(inner) - 1
    j = i
    while 0 <= j < len(inner) and abs(j - i) <= _MAX_WORD and inner[j].isascii() and inner[j].isalpha():
        j += step
    return (inner[i:j] if step > 0 else inner[j + 1:i + 1]).lower() in _WORD_VALUE


def _operand_edge(ch: str) -> bool:
    """Whether ``ch``, at the edge of a text in emphasis, can be or hold an operand."""
    return ch.isdigit() or ch in "()" or (not ch.isalpha() and _wrapper(ch))


def _operand_next(text: str, pos: int, step: int) -> bool:
    """Whether past ``pos`` in direction ``step`` (spaces, tabs and quotes apart) stands an
    operand: a number, a bracket closing (before) or opening (after) a number, a number word or a
    one-letter variable (``a``, ``A`` and ``I`` are words). A run of stars between it and the
    equation may be the power operator (``two **5 + 23 = 28**``), not emphasis."""
    return _operand_beyond(text, pos, step, emphasis=True)


def _continues_from_previous_line(text: str, start: int) -> str | None:
    """Why the equation starting its line at ``start`` continues the line before, or None."""
    i = start - 1
    while i >= 0 and text[i] in _SPACE:
        i -= 1
    if i >= 0 and text[i] != "\n":
        return None  # the equation does not start its line
    while i >= 0:
        if text[i].isspace():
            i -= 1
        elif _latex_command_back(text, i) >= 0:  # (a LaTeX command ending it: "2 * \\bf")
            i = _latex_command_back(text, i) - 1
        else:
            break
    if i < 0:
        return None
    ch = text[i]
    if ch == "|" and _table_row(text, i):
        return None
    if ch in "+-*/=(" or ch in _DISALLOWED_ASCII or unicodedata.category(ch) == "Sm" or ch in _OPERATOR_SYMBOLS:
        return f"the equation continues the line before, which ends in {ch!r}"
    if ch in "$`":  # a math or code span closing the line: an operator inside it ends it too ($2 \\times$)
        while i >= 0 and (text[i] in "$`" or text[i] in _SPACE):
            i -= 1
        if i < 0 or text[i] == "\n":
            return None
        ch = text[i]
        if ch in "+-*/=(" or unicodedata.category(ch) == "Sm" or ch in _OPERATOR_SYMBOLS:
            return f"the equation continues the line before, which ends in {ch!r} inside a span"
    kind, value, j = _token(text, i, -1)
    if kind == "word" and value in OPERATOR_WORDS:
        return f"the equation continues the line before, which ends in {value!r}"
    if kind == "word" and value == "not" and j >= 0 and text[j] == "\\":
        # (LaTeX's \\not draws a solidus over what follows it, as U+0338 does: over the equation's first sign)
        return "the equation continues the line before, which ends in LaTeX's \\not"
    return None


def _table_row(text: str, end: int) -> bool:
    """Whether the line whose last character, a ``|``, is at ``end`` is a Markdown table row: it
    starts with ``|`` (blanks apart), holds at least three, and its last cell does not end in an
    operator symbol of any form or a dash (``| 1 | 6 * 50 | 300 |``, ``|---|---|``; not ``|3 - 5|
    + |``, ``| 3 | 2 \u00d7 |``, ``| 3 | 2 ^ |``: an open bar)."""
    first = max(text.rfind("\n", 0, end), text.rfind("\r", 0, end)) + 1
    row = text[first:end + 1].strip(" \t")
    if not row.startswith("|") or row.count("|") < 3:
        return False
    if not row.strip("|-: \t"):
        return True  # a divider row, |---|:--:|
    j = end - 1
    while j > first and text[j] in _SPACE:
        j -= 1
    ch = text[j]  # the last cell's end: no operator of any form (| 3 | 2 \u2212 |, | 2 ^ |)
    if ch == "|":
        return True  # (an empty last cell)
    # (a word ending it is a cell, "| 5, 23 | Add |", as a word ends a line before)
    return not (ch in "+-*/=(" or ch in _DISALLOWED_ASCII or unicodedata.category(ch) in ("Sm", "Pd")
                or ch in _OPERATOR_SYMBOLS)


def _denied_label(text: str, start: int) -> str | None:
    """A word of :data:`LABEL_DENIALS` among the four words before a colon just before the final
    equation starting at ``start`` (``Wrong: 5 + 23 = 28``), or None. Labels chained on its line
    are each read (``Wrong: Answer: 5 + 23 = 28``, ``**Incorrect:** - **Result:** ...``), and a
    label chain (or nothing) that starts the line is read on past a heading on the line before,
    blank lines apart: a short line ending in a colon, a Markdown heading (``### Wrong answer``)
    or a line of up to four words with no digit or sentence mark (``**Wrong answer**``), each
    read as a label ending in a colon."""
    i = _past_marks(text, start - 1)
    crossed = False  # past a line break: the label read now is a heading on a line before
    if i < 0 or text[i] in "\n\r":
        i, crossed = _heading_end(text, i), True
        if i is None:
            return None
    elif text[i] != ":":
        return None
    elif "\n" in text[i:start] or "\r" in text[i:start]:
        crossed = True
    heading: tuple[list[int], list[int]] | None = None  # the heading line's sentence marks and words
    for _ in range(len(text)):  # (one label after another, back along the text: linear)
        if crossed:
            # a label that ends the line before counts when it is a short heading, of up to eight
            # words after the line's last sentence mark ("Wrong:\n5 + 23 = 28"; a logged, rightly paid
            # retry wrote "Here's a rewritten equation that avoids the issue of the original equation
            # being incorrect:\n\n22 + 7"); the line is read once for all the labels chained on it
            if heading is None:
                first = max(text.rfind("\n", 0, i), text.rfind("\r", 0, i)) + 1
                heading = ([m.start() for m in _CLAUSE_MARK.finditer(text, first, i)],
                           [m.start() for m in _ASCII_WORD_RUN.finditer(text, first, i)])
            marks, word_starts = heading
            clause = first
            n_marks = bisect.bisect_left(marks, i - 1)  # (a mark just before i has no blank after it in text[:i])
            if n_marks:
                clause = marks[n_marks - 1] + 1
            if bisect.bisect_left(word_starts, i) - bisect.bisect_left(word_starts, clause) > 8:
                return None
        words, tokens, i = 0, 0, i - 1
        while words < 4 and tokens < 8:
            kind, value, i = _token(text, i, -1)
            tokens += 1
            if kind is None and 0 <= i < len(text) and (text[i] in _WORD_PARENS or text[i] in "#{}[]$"):
                i -= 1  # "Answer (wrong): 5 + 23 = 28", "Wrong answer #2: ...", "\\text{Wrong}: ...", "[Wrong]: ..."
                continue
            if kind is None and words and 0 <= i < len(text) and text[i] == "\\" and _ASCII_LETTER.match(text, i + 1):
                i, words = i - 1, words - 1  # (the word read was a LaTeX command's name: "Wrong \\bf answer:")
                continue
            if kind == "skip":
                continue
            if kind == "number":  # a number in the label, a word of it ("Wrong step 2:", "Incorrect: Step 2:")
                words += 1
                continue
            if kind != "word":
                break
            if value in LABEL_DENIALS or (words == 0 and value in BARE_LABEL_DENIALS and _starts_label(text, i)):
                return f"the equation is denied ({value!r} before it)"
            if any(map(_other_alphabet, value.translate(_LATIN_BASE))):  # "Неверно: 5 + 23 = 28", as without the colon
                return f"a word in another alphabet in the label before the equation ({value!r})"
            words += 1
        if words >= 4 or tokens >= 8:
            return None
        # the label read was short: another label before it on its line (bullets, quote marks,
        # emphasis apart), or the line's start and a heading on the line before (one heading)
        i = _past_marks(text, i)
        if i < 0 or text[i] in "\n\r":
            if crossed:
                return None
            i, crossed = _heading_end(text, i), True
            if i is None:
                return None
        elif text[i] != ":":
            return None
    return None


_LABEL_MARKS = "-+>#$"  # list bullets, quote and heading marks, math dollars between labels


def _past_marks(text: str, i: int) -> int:
    """The index of the last character at or before ``i`` that is not a blank, emphasis, one of
    :data:`_LABEL_MARKS` or the number of a numbered list item (``1.`` or ``2)`` with a blank
    after it: ``### Wrong answer\n\n1. 5 + 23 = 28``, ``Wrong: 1. <answer>``)."""
    while i >= 0:
        ch = text[i]
        if ch in _SPACE or ch in _DECORATION or ch in _LABEL_MARKS:
            i -= 1
            continue
        if ch.isascii() and ch.isalpha() and _latex_command_back(text, i) >= 0:
            i = _latex_command_back(text, i) - 1  # (a LaTeX command: "Wrong: \\bf 5 + 23 = 28")
            continue
        if ch in ".)" and text[i + 1: i + 2] in (" ", "\t") and i > 0 and text[i - 1] in "0123456789":
            j = i - 1
            while j >= 0 and i - j <= 3 and text[j] in "0123456789":
                j -= 1
            if j < 0 or not (text[j].isalnum() or text[j] in ".,"):
                i = j  # (the item number, 1 to 3 digits)
                continue
        break
    return i


def _heading_end(text: str, i: int) -> int | None:
    """For the line break at ``i`` (-1: the text's start), where the label on the last line before
    it that is not blank ends, read as ending in a colon: its colon, the end of a Markdown heading
    (``### Wrong answer``) or of a line of up to four words and no digit or sentence mark
    (``**Wrong answer**``, its emphasis left out; :data:`_PLAIN_HEADING`); None for other lines. Lines of marks alone
    (``___``, ``"``) are passed, as blank ones."""
    while i >= 0:
        if text[i].isspace() or text[i] in _DECORATION or text[i] in _LABEL_MARKS:
            i -= 1
        elif _latex_command_back(text, i) >= 0:  # (a LaTeX command ending the line: "Wrong: \\bf")
            i = _latex_command_back(text, i) - 1
        else:
            break
    if i < 0:
        return None
    end = i + 1
    while i >= 0 and text[i] in _DECORATION:
        i -= 1
    if i >= 0 and text[i] == ":":
        return i
    first = max(text.rfind("\n", 0, end), text.rfind("\r", 0, end)) + 1
    while first < end and text[first] in _SPACE:
        first += 1
    line = text[first:end]
    if line.startswith("#") or (_PLAIN_HEADING.fullmatch(line) and len(_ASCII_WORD_RUN.findall(line)) <= 4):
        return end  # (Markdown bold around the line was read as emphasis and left out)
    return None


#: A line read as a heading without a colon or ``#``: words alone, no digit and no sentence or
#: clause mark (``**Wrong answer**``, ``Not quite``; not ``Oops, wrong`` or ``23 + 5 = 29 is
#: wrong``, which say the earlier answer was wrong, before the right one on the next line)
_PLAIN_HEADING = re.compile(r"[A-Za-z' \t()_*\"\u2019-]+")


def _starts_label(text: str, i: int) -> bool:
    """Whether the word ending (read backwards) at ``i`` starts its text, line, sentence or a label
    chained after another one, blanks, emphasis and heading marks apart (``**Error:**``, ``###
    Mistake:``, ``Answer: Mistake:``)."""
    while i >= 0 and (text[i] in _SPACE or text[i] in _DECORATION or text[i] in "#>-"):
        i -= 1
    return i < 0 or text[i] in _LINE_BREAKS or text[i] in ".!?:"


def _strip_markup(text: str, a: int, b: int) -> tuple[int, int]:
    """Shrink ``text[a:b]`` (the run without its outer spaces) by Markdown bold markers (``**``
    that pair up with another on the same line), by parentheses around a whole equation and by a
    parenthesis that opens or closes prose next to it; returns the new bounds, spaces stripped."""
    line_start = text.rfind("\n", 0, a) + 1
    line_end = text.find("\n", b)
    line_end = len(text) if line_end < 0 else line_end
    total = text.count("**", line_start, line_end)
    paired = total - total % 2  # markers with index < paired have a partner

    def is_markup(k: int) -> bool:
        return text.count("**", line_start, k) < paired

    if b - a > 2 and _list_bullet(text, a):  # a Markdown list item: - 5 + 23 = 28
        a, b = _trim(text, a + 1, b)
    for _ in range(3):  # each step can uncover the next: **(5 + 23 = 28)** (using both)
        before = a, b
        if (b - a >= 2 and text.startswith("**", a) and (a == 0 or not text[a - 1].isalnum()) and is_markup(a)
                and not _operand_next(text, a, -1)):  # (two **5 + 23 = 28**: maybe a power)
            a += 2
        if (b - a >= 2 and text.startswith("**", b - 2) and (b >= len(text) or not text[b].isalnum())
                and is_markup(b - 2) and not _operand_next(text, b - 1, 1)):
            b -= 2
        if (b - a >= 3 and text[a] == "*" == text[b - 1] and text[a + 1] not in "* \t" and text[b - 2] not in "* \t"
                and (a == 0 or not (text[a - 1].isalnum() or text[a - 1] in "_*"))
                and (b >= len(text) or not (text[b].isalnum() or text[b] in "_*"))
                and not _operand_next(text, a, -1) and not _operand_next(text, b - 1, 1)):
            a, b = a + 1, b - 1  # one "*" of emphasis on each side: *5 + 23 = 28*
        a, b = _trim(text, a, b)
        if b - a > 1 and text[a] == ")" and a > 0 and (_is_letter(text[a - 1]) or text[a - 1] in ".,:;!?'\""):
            a += 1
        if b - a > 1 and text[b - 1] == "(" and b < len(text) and _is_letter(text[b]):
            b -= 1
        a, b = _trim(text, a, b)
        if b - a > 2 and text[a] == "(" and text[b - 1] == ")" and "=" in text[a:b] and _outer_parens(text, a, b):
            a, b = _trim(text, a + 1, b - 1)
        if (a, b) == before:
            break
    return a, b


def _underscores_around(text: str, start: int, end: int) -> int:
    """The length of the ``_``, ``__`` or ``___`` that emphasises the run ``text[start:end]`` on both
    sides, glued to it and to nothing outside (``_5 + 23 = 28_``; not ``x_5 + 23_``), or 0."""
    n = 0
    while n < 4 and start - n > 0 and text[start - n - 1] == "_":
        n += 1
    if not 0 < n <= 3 or text[end: end + n] != "_" * n or text[start] in _SPACE or text[end - 1] in _SPACE:
        return 0
    outside = (text[start - n - 1] if start > n else "", text[end + n: end + n + 1])
    return 0 if any(c and (c.isalnum() or c == "_") for c in outside) else n


def _outer_parens(text: str, a: int, b: int) -> bool:
    """Whether the ``(`` at ``a`` is closed by the ``)`` at ``b - 1``."""
    depth = 0
    for k in range(a, b):
        depth += {"(": 1, ")": -1}.get(text[k], 0)
        if depth == 0:
            return k == b - 1
    return False


def _trim(text: str, a: int, b: int) -> tuple[int, int]:
    while a < b and text[a] in _SPACE:
        a += 1
    while b > a and text[b - 1] in _SPACE:
        b -= 1
    return a, b


def _operand_problem(text: str, start: int) -> str | None:
    """Earlier in its sentence, an operation on "both sides" / "itself" makes the final equation an
    operand, not the answer ("Next, I multiplied 12 by both sides of the equation 8 + 4 = 12")."""
    sentence = max(text.rfind(c, 0, start) for c in ".!?" + _LINE_BREAKS) + 1
    action_at = None
    for k, m in enumerate(_REST_TOKEN.finditer(text, sentence, start)):
        word = m.group().lower().replace("\u2019", "'")
        if word in ARITHMETIC_ACTIONS:
            action_at = k
        elif word in OPERAND_OBJECTS and action_at is not None and k - action_at <= 5:
            return f"an operation on {word!r} before the final equation makes it an operand"
    return None


def _bare_problem(text: str, i: int) -> str | None:
    """A bare expression (no written result) is an answer only where its sentence ends: before
    the sentence's end (or a number, which :func:`_after_problem` reads) only :data:`AFTER_BARE`
    words and symbols may follow it ("5 + 23 is the answer."), and a text cut off after it ends
    in one of :data:`_AFTER_BARE_ENDS` ("... 8 + 4 equals" is not)."""
    last = None
    while i < len(text):
        ch = text[i]
        if ch in ".!?;:" or ch in _LINE_BREAKS or ch.isnumeric():
            return None
        if not _wordish(ch):
            i += 1
            continue
        kind, value, j = _token(text, i, +1)
        if kind == "skip":  # quotes or emphasis
            i = j
            continue
        if kind != "word" or value not in AFTER_BARE:
            return f"the expression is mentioned in a sentence, not given as its answer ({text[i:i + 12]!r} after it)"
        last, i = value, j
    if last is not None and last not in _AFTER_BARE_ENDS:
        return f"the text stops after the expression ('{last}'), before any result"
    return None


_CLAUSE_MARKS = ".!?,;:" + _LINE_BREAKS
#: Words after which a negation earlier in the clause no longer governs a bare expression: a new
#: clause, or the expression stated as the answer ("I did not subtract and the answer is 3 + 11").
CLAUSE_RESETS = frozenset("""
    but so and then now instead is was are be answer answers result results solution equation
    expression correct right
""".split())


def _bare_denied(text: str, start: int) -> str | None:
    """A negation earlier in the clause of a bare expression starting at ``start`` (after the last
    mark of :data:`_CLAUSE_MARKS`), with no word of :data:`CLAUSE_RESETS` after it, denies it:
    ``the math doesn't factor into a simple sum of 3 + 11.`` gives no answer."""
    lo = max(text.rfind(c, 0, start) for c in _CLAUSE_MARKS) + 1
    denial = None
    for m in _REST_TOKEN.finditer(text, lo, start):
        word = m.group().lower().replace("\u2019", "'")
        if word in CLAUSE_RESETS:
            denial = None
        elif word in NEGATIONS:
            denial = denial or word
    return f"the expression is denied earlier in its clause ({denial!r})" if denial else None


def _restatement(text: str, m: re.Match, answers: tuple[str, ...], target: int) -> bool:
    """Whether the arithmetic run ``m`` of ``text`` only restates the result (``28 = 28``,
    ``Result = 28``: the target alone, with ``=``) or, spaces apart, is one of ``answers`` (the
    answer block's equation, with or without ``= target``: ``Check: 5 + 23 = 28 ✓``), standing
    alone: after a line break, a colon, emphasis, a backquote, ``$`` or a word and a blank, and
    before a line break, emphasis, a backquote, ``$``, a check mark or a sentence mark that
    starts no decimal. Such a run is not another equation."""
    run = m.group()
    if _SPLIT_NUMBER.search(run):  # ("Result = 2 8" writes two numbers, not the target)
        return False
    key = run.replace(" ", "").replace("\t", "")
    if key not in answers and ("=" not in key or any(part not in ("", str(target)) for part in key.split("="))):
        return False  # (the caller's runs hold a digit: the target is there)
    a, b = m.start(), m.end()
    before = text[a - 1] if a > 0 else ""
    if not (before in ("\n", "\r", ":", "*", "_", "`", "$")
            or (before.isalpha() and run[0] in _SPACE)):
        return False
    after = text[b] if b < len(text) else ""
    return (after in ("", "\n", "\r", "*", "_", "`", "$", "\u2713", "\u2705", "\u2714")
            or (after in ".," and not text[b + 1: b + 2].isdigit()))


_SPLIT_NUMBER = re.compile(r"[0-9][ \t]+[0-9]")


def _without_restatements(rest: str, content: str | None, target: int) -> str:
    """``rest`` with each run that restates the result or the answer block's equation ``content``
    (None without tags) read as blanks (:func:`_restatement`): it is not another equation. A run
    that starts with a number or a bracket leaves the target where it starts, so what the text
    does to that number is still read after the final equation (``Then minus 28 = 28``, ``times
    28 = 28``, ``\u2260\n28 = 28``: an operation on a number); one that starts with ``=`` is the
    result written apart (```5 + 23` = 28``) and leaves nothing."""
    answers: tuple[str, ...] = ()
    if content is not None:
        key = content.replace(" ", "").replace("\t", "")
        bare = key.split("=")[0]
        answers = (key, bare, f"{bare}={target}")
    out, at = [], 0
    for m in _RUN.finditer(rest):
        s = m.group()
        body = s.lstrip(_SPACE)
        result = str(target) if body[:1] in "0123456789(" else ""
        if (_HAS_OP.search(s) and _HAS_DIGIT.search(s) and len(result) < len(body.rstrip(_SPACE))
                and _restatement(rest, m, answers, target)):
            out.append(rest[at:m.start()])
            out.append(" " * (len(s) - len(body)) + result.ljust(len(body)))
            at = m.end()
    out.append(rest[at:])
    return "".join(out)


def final_equation(text: str, nums: list[int] | None = None, target: int | None = None) -> tuple[str | None, str]:
    """``(equation, "")`` for the final equation of ``text`` (already :func:`normalise`-d; see
    the module docstring), or ``(None, reason)`` when there is none or it is not a valid answer.
    A result written in words is appended as ``= value``; ``nums`` and ``target`` enable the
    checks of the text after it."""
    last = None
    for m in _RUN.finditer(text):
        s = m.group()
        if _HAS_OP.search(s) and _HAS_DIGIT.search(s):
            last = m
    if last is None:
        return None, "no equation"
    start, end = last.span()
    a, b = _strip_markup(text, *_trim(text, start, end))
    if a >= b:
        return None, "no equation"
    equation = text[a:b]
    # The characters just outside the run; "glued" = no space between them and the equation.
    glued_left = not any(c in _SPACE for c in text[start:a])
    glued_right = not any(c in _SPACE for c in text[b:end])
    emphasis = _underscores_around(text, start, end)  # (read past: _5 + 23 = 28_)
    left, right = start - 1 - emphasis, end + emphasis
    if emphasis:  # ... and past the blanks beyond them, as the run takes in its own: "_5 + 23 = 28_ ^ n"
        while left >= 0 and text[left] in _SPACE:
            left -= 1
        while right < len(text) and text[right] in _SPACE:
            right += 1
        glued_left, glued_right = left == start - 1 - emphasis, right == end + emphasis
    for pos, glued, after in ((left, glued_left, False), (right, glued_right, True)):
        why = _neighbour_problem(text, pos, glued, after, "=" in equation)
        if why:
            return None, why
    why = (_words_problem(text, start, end) or _denied_label(text, start)
           or _continues_from_previous_line(text, start) or _operand_problem(text, start)
           or _before_answer_word(text, start, "=" in equation)
           or _wrapped_problem(text, start, "=" in equation) or _wrapped_after_problem(text, end))
    if why:
        return None, why
    linked = 0  # words between the expression and its result written in words
    if "=" not in equation:
        result, negated = _number_after(text, end, strict=True)
        if negated:
            return None, "the equation is denied (a negation before its result)"
        if result is not None:
            equation += " = " + result
            if result.isdigit():
                linked = sum(1 for m in _REST_TOKEN.finditer(text, end, text.find(result, end)) if m.group()[0].isalpha())
        else:
            why = _bare_problem(text, b) or _bare_denied(text, start)
            if why:
                return None, why
    if nums is not None:  # (a "(" the run took in, left out of the equation, opens the text after it)
        why = _after_problem(text, end - 1 if b < end and text[end - 1] == "(" else end + emphasis, nums, target,
                             linked)
        if why:
            return None, why
    return equation, ""


_NOT_WRAPPERS = frozenset(".,;:!?+-*/=()^%|~\\[]{}<>" + DENIAL_MARKS + _OPERATOR_SYMBOLS)  # (· ✕ ➕: operators)


def _wrapper(ch: str) -> bool:
    """Whether ``ch`` only wraps or marks the equation (quotes of any script, ``$``, ``#``,
    bullets, emoji, full-width or CJK brackets): punctuation or a symbol that is not a sentence
    mark, an operator, a bracket the task reads, a dash or a math sign."""
    if ch in _NOT_WRAPPERS or ch.isalnum() or ch.isspace():
        return False
    cat = unicodedata.category(ch)
    return cat[0] in "PS" and cat not in ("Sm", "Pd")


def _fence_start(text: str, nl: int) -> int:
    """Where the code fence (three or more backquotes or tildes, maybe an info string after them,
    as ``python``) or the ``$$`` that ends the line before the line break at ``nl`` starts, blanks
    and blank lines apart, or -1: the block it opens holds what follows, as a person reads it."""
    k = nl
    while k > 0 and text[k - 1].isspace():
        k -= 1
    m = k
    while m > 0 and k - m < 20 and text[m - 1].isascii() and text[m - 1].isalnum():
        m -= 1  # (an info string: "```python")
    fence = text[m - 1: m] if m > 0 else ""
    if fence not in ("`", "~", "$") or (fence == "$" and m < k):
        return -1
    i = m
    while i > 0 and text[i - 1] == fence:
        i -= 1
    return i if m - i >= (2 if fence == "$" else 3) else -1


#: Names of LaTeX commands that the readers before the equation stop at, as words: they change
#: what it means (``\\sqrt``, ``\\log``, ``\\neg``, ``\\not``); any other command (``\\mathbf``, ``\\large``,
#: ``\\therefore``, ``\\implies``, ``\\Rightarrow``) is markup or a symbol between words and is read past.
_LATEX_WORDS = OPERATOR_WORDS | NEGATIONS | HYPOTHETICALS | LABEL_DENIALS


def _latex_command_back(text: str, i: int) -> int:
    """Where the LaTeX command (a backslash and ASCII letters) whose last letter is at ``i`` starts,
    or -1 when ``text[i]`` ends no command or the command's name is one of :data:`_LATEX_WORDS`
    (read as that word). The readers before the final equation (or answer block) read past it as
    past a blank: a command between a denial and the equation hides nothing (``Wrong: $\\mathbf
    25 \\times 4 - 3 = 97$``, ``Not \\therefore 25 * 4 - 3 = 97``). One pass over its letters."""
    j = i
    while j >= 0 and text[j].isascii() and text[j].isalpha():
        j -= 1
    if j == i or j < 0 or text[j] != "\\" or text[j + 1:i + 1].lower() in _LATEX_WORDS:
        return -1
    return j


def _past_wrapping(text: str, i: int) -> int:
    """The start of the blanks, opening parentheses, wrapper symbols (:func:`_wrapper`) and LaTeX
    commands that are no operator or denial (:func:`_latex_command_back`: ``\\mathbf``,
    ``\\therefore``) just before ``i``, read on past a line break that a code fence or ``$$``
    opening the block ends (``If`` and a fence, then ``5 + 23 = 28`` on the next line): one pass
    back, linear."""
    while True:
        while i > 0:
            c = text[i - 1]
            if c in _SPACE or c == "(" or _wrapper(c):
                i -= 1  # (a parenthesis before an answer block: "Wrong: (<answer>...</answer>)")
            elif c.isascii() and c.isalpha() and _latex_command_back(text, i - 1) >= 0:
                i = _latex_command_back(text, i - 1)
            else:
                break
        fence = _fence_start(text, i - 1) if i > 0 and text[i - 1] == "\n" else -1
        if fence < 0:
            return i
        i = fence


def _standalone_mark(text: str, j: int) -> bool:
    """Whether the dash, ``*``, ``+`` or ``>`` at ``j`` stands alone between words and the equation:
    a list bullet or quote mark that starts its line (``- \\boxed{...}``), or a dash or star with
    blanks on both sides (``Assume - <answer>``); as an operator it was read already."""
    ch = text[j]
    if not (ch in "*>+" or unicodedata.category(ch) == "Pd") or text[j + 1: j + 2] not in (" ", "\t"):
        return False
    return _bullet(text, j) or (ch not in ">+" and j > 0 and text[j - 1] in _SPACE)


def _wrapped_problem(text: str, start: int, written: bool, again: bool = True) -> str | None:
    """The checks of the text before the equation (or answer block) starting at ``start`` again,
    past the wrapper symbols and blanks just before it (:func:`_past_wrapping`): ``Wrong: $5 + 23 =
    28$``, ``If \u201c5 + 23 = 28\u201d``, ``Not \u2022 5 + 23 = 28``, ``2 * \u201c5 + 23 = 28\u201d`` and
    a code fence opened after ``If`` are read as without them (they stopped the reading, so the
    equation was paid); then once more past a dash, star or ``>`` that stands alone there, a
    bullet or a prose dash (``Assume - <answer>``, ``Wrong answer:\n- \\boxed{...}``), once its own
    check as a neighbour has passed. ``again``: also before an "answer" word just past them
    (``Wrong: \\boxed{$5 + 23 = 28$}``), one level deep."""
    outer = _past_wrapping(text, start)
    read = outer < start and any(c in "(\n\\" or _wrapper(c) for c in text[outer:start])  # (\\: a LaTeX command)
    for _ in range(2):
        j = outer - 1
        if read:
            plain = _closes_emphasis(text, j)  # ("**Answer:** $5 + 23 = 28$")
            why = (None if j < 0 or plain or (text[j] in "-*+>" and _bullet(text, j) and _bullet_blank(text, j))
                   else _neighbour_problem(text, j, text[outer] not in _SPACE, False, written))
            why = why or (_words_problem(text, outer, len(text)) or _denied_label(text, outer)
                          or _continues_from_previous_line(text, outer)
                          or (_before_answer_word(text, outer, written, again=False) if again else None))
            if why:
                return why
        if not (j >= 0 and _standalone_mark(text, j)):
            return None
        outer, read = _past_wrapping(text, j), True
    return None


def _closes_emphasis(text: str, j: int) -> bool:
    """Whether the run of ``*`` and ``_`` (blanks among them) ending at ``j`` is Markdown emphasis
    closing a label (``**Answer:** $5 + 23 = 28$``), not an operator: no digit, operator or math
    sign before it, and no operand word (``n * $5 + 23$`` is a product)."""
    k = j
    while k >= 0 and (text[k] in "*_" or text[k] in _SPACE):
        k -= 1
    return (k < j and not (k >= 0 and (text[k].isdigit() or text[k] in "+-*/=()" or text[k] in _DISALLOWED_ASCII
                                       or unicodedata.category(text[k]) == "Sm"))
            and not _operand_next(text, k + 1, -1))


def _wrapped_after_problem(text: str, end: int) -> str | None:
    """The checks of the text after the equation (or answer block) ending at ``end`` again, past
    the blanks and wrapper symbols (:func:`_wrapper`) just after it: ``$5 + 23 = 28$ mod n``,
    ``\u201c5 + 23 = 28\u201d \u00d7 n`` and ``\u201c<answer>...</answer>\u201d ^ n`` are read as
    without them (the symbol stopped the reading, so the equation was paid). A ``!`` there is
    prose, past the symbol that closes the equation: ``The answer is $5 + 23$!``."""
    i = end
    while i < len(text) and (text[i] in _SPACE or _wrapper(text[i])):
        i += 1
    if not any(_wrapper(c) for c in text[end:i]):
        return None
    return _neighbour_problem(text, i, False, True, True) or _words_problem(text, 0, i)


def _before_answer_word(text: str, start: int, written: bool, again: bool = True) -> str | None:
    """The checks of the text before the equation, again before the word ``answer`` just before
    it: :func:`normalise` reads ``<answer>`` and ``\\boxed{`` as that word, which must not hide
    what is written before them (``3 * \\boxed{21 - 19}``, ``Wrong: <answer>5 + 23 = 28</answer>``)."""
    i = start - 1
    while i >= 0 and text[i] in _SPACE:
        i -= 1
    left = i - 5
    if left < 0 or text[left:i + 1].lower() != "answer" or (left > 0 and _wordish(text[left - 1])):
        return None
    j = left - 1
    while j >= 0 and text[j] in _SPACE:
        j -= 1
    plain = _closes_emphasis(text, j)  # ("**Answer:** \\boxed{...}")
    why = (None if j < 0 or plain or text[j] == "=" or (text[j] in "-*+>" and _bullet(text, j) and _bullet_blank(text, j))
           else _neighbour_problem(text, j, j == left - 1, False, written))
    if not why and j >= 0 and _beyond(text, start - 1, 1) == "(" and _applied_variable(text, j, "answer"):
        why = f"a function or variable applied to the equation ({text[j]!r} before its parenthesis)"  # (f \\boxed{(...)})
    why = why or (_denied_label(text, left) or _continues_from_previous_line(text, left)
                  or _operand_problem(text, left) or _wrapped_problem(text, left, written, again))
    return why.replace("the equation", "the answer") if why else None


# ---------------------------------------------------------------------------------------
# checking it
# ---------------------------------------------------------------------------------------
def _evaluate(node: ast.AST, literals: list[int]) -> Fraction:
    """Exact value of a whitelisted expression tree; collects its integer literals."""
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left = _evaluate(node.left, literals)
        right = _evaluate(node.right, literals)
        op = type(node.op)
        if op is ast.Add:
            return left + right
        if op is ast.Sub:
            return left - right
        if op is ast.Mult:
            return left * right
        if right == 0:
            raise _Reject("division by zero")
        return left / right
    if isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 0:
        literals.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp):
        raise _Reject("unary operators are not allowed")
    if isinstance(node, ast.BinOp):
        raise _Reject("only + - * / are allowed")
    raise _Reject(f"{type(node).__name__} is not allowed")


def _literals(node: ast.AST, out: list[int], ops: str) -> None:
    """The integer literals of a whitelisted tree, left to right (before any arithmetic); raises
    :class:`_Reject` for anything else, and for an operator not in ``ops``."""
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        if _OPS[type(node.op)] not in ops:
            raise _Reject(f"uses {_OPS[type(node.op)]!r}; this task allows only {' '.join(ops)}")
        _literals(node.left, out, ops)
        _literals(node.right, out, ops)
    elif isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 0:
        out.append(node.value)
    else:
        _evaluate(node, [])  # raises the reason this node is not allowed


def check_answer(answer: str, nums: list[int], target: int, ops: str = "+-*/") -> tuple[bool, str]:
    """Check an answer string (``expression`` or ``expression = value``) over the operators
    ``ops``; ``(ok, reason)``. Raises nothing."""
    try:
        if len(answer) > 16 * MAX_ANSWER_CHARS:  # cheap bound before any other work
            return False, f"answer longer than {MAX_ANSWER_CHARS} characters"
        expr = _WS.sub(" ", answer).strip()
        if not expr:
            return False, "empty answer"
        if len(expr) > MAX_ANSWER_CHARS:
            return False, f"answer longer than {MAX_ANSWER_CHARS} characters"
        n_eq = expr.count("=")
        if n_eq > 1:
            return False, "more than one '=' (a chained equation)"
        if n_eq == 1:
            expr, rhs = (s.strip() for s in expr.split("="))
            if not _VALUE.fullmatch(rhs):
                return False, "the right-hand side of '=' is not a single integer"
            if rhs.lstrip("-") != str(abs(int(rhs))) or rhs == "-0":
                return False, f"number with a leading zero or sign: {rhs}"
            if int(rhs) != target:
                return False, f"the written result {rhs} is not the target {target}"
            if not expr:
                return False, "nothing on the left of '='"
        if not _EXPR_CHARS.fullmatch(expr):
            return False, "the answer may contain only digits, + - * /, parentheses and spaces"
        for tok in _INT.findall(expr):
            if len(tok) > 1 and tok[0] == "0":
                return False, f"number with a leading zero: {tok}"
        tree = ast.parse(expr, mode="eval")
        literals: list[int] = []
        _literals(tree.body, literals, ops)
        if Counter(literals) != Counter(int(x) for x in nums):
            return False, f"uses the numbers {sorted(literals)}, not each of {sorted(nums)} exactly once"
        value = _evaluate(tree.body, [])
        if value != target:
            return False, f"evaluates to {value}, not {target}"
        return True, "correct"
    except _Reject as e:
        return False, str(e)
    except SyntaxError:
        return False, "not a valid expression"
    except (RecursionError, MemoryError, ValueError) as e:  # too deep, too big, a number past int()'s
        # digit limit: just wrong (anything else is a bug, which Task.verify counts as a verifier error)
        return False, f"rejected ({type(e).__name__})"


def check_completion(text: Any, nums: list[int], target: int, *, tags: bool = True,
                     ops: str = "+-*/") -> tuple[bool, str]:
    """Verdict and reason for a whole completion (see the module docstring)."""
    if not isinstance(text, str):
        return False, "completion is not a string"
    if len(text) > MAX_COMPLETION_CHARS:
        return False, f"completion longer than {MAX_COMPLETION_CHARS} characters"
    thought = leading_reasoning_end(text)
    if thought is None:
        return False, "the reasoning block (<think>) is never closed: no answer"
    text = text[thought:]
    if tags:
        close = text.rfind("</answer>")
        opening = text.rfind("<answer>", 0, close) if close >= 0 else -1
        if opening < 0:
            return False, "no <answer> </answer> block"
        after = close + len("</answer>")
        if text.find("<answer>", after) >= 0:
            return False, "a later <answer> block is not closed"
        if _LATER_TAG.search(text, after):
            return False, "a later answer tag in another spelling"
        content = text[opening + len("<answer>"): close]
        if _struck_over(text, opening, after):  # ("<del><answer>...</answer></del>": taken back, as without tags)
            return False, "the answer block is struck through (<del>, <s> or <strike> around it)"
        # The text around the block, read as a person sees it; the block is one NUL between them.
        before, why = normalise(text[:opening])
        rest, why_rest = normalise(text[after:])
        if before is None or rest is None:
            return False, why or why_rest
        joined = _without_thematic_breaks(before + "\0" + rest)  # (normalise drops any NUL of the text)
        cut = joined.index("\0")
        before, rest = joined[:cut], joined[cut + 1:]
        # (the block glued to a ">" that opens its line, "><answer>", leaves it a comparison, as ">5")
        view = _without_emphasis(_unquoted(before + "\0") + _without_restatements(rest, content, target))
        block = view.index("\0")
        end = block + 1
        left = block - 1
        while left >= 0 and view[left] in _SPACE:
            left -= 1
        right = end
        while right < len(view) and view[right] in _SPACE:
            right += 1
        for pos, glued, is_after in ((left, left == block - 1, False), (right, right == end, True)):
            why = _neighbour_problem(view, pos, glued, is_after, True)  # "!" after the closing tag is prose
            if why:
                return False, why.replace("the equation", "the answer block")
        if left >= 0 and content.strip().startswith("(") and _applied_variable(view, left, "\0"):
            return False, f"a function or variable applied to the answer block ({view[left]!r} before it)"
        why = (_words_problem(view, block, end) or _denied_label(view, block) or _wrapped_problem(view, block, True)
               or _wrapped_after_problem(view, end)
               or _continues_from_previous_line(view, block) or _after_problem(view, end, nums, target))
        if why:
            return False, why.replace("the equation", "the answer block")
        return check_answer(content, nums, target, ops)
    text, why = normalise(text)
    if text is None:
        return False, why
    text = _without_thematic_breaks(text)
    equation, why = final_equation(_without_emphasis(_without_restatements(_unquoted(text), None, target)),
                                   nums, target)
    if equation is None:
        return False, why
    return check_answer(equation, nums, target, ops)
