"""A SYNTHETIC stand-in for the APIGen / xlam-function-calling-60k data set.

The real data set (Salesforce/xlam-function-calling-60k) is gated and is not shipped with r3. This
module generates records in exactly its format -- ``{"id", "query", "tools", "answers"}`` where
``tools`` and ``answers`` are JSON strings, each tool ``{"name", "description", "parameters":
{name: {"description", "type", "default"?}}}`` and each answer ``{"name", "arguments"}`` -- from a
small hand-written catalogue of typed tools (weather, currencies, maths, search, text, ...) and
templated queries, with single calls, parallel calls of one tool and calls of different tools, plus
distractor tools the query does not need. It is meant for tests and demos, NOT as a benchmark:
results on it say nothing about results on the real data.

``synthetic_xlam(n, seed)`` is deterministic in ``(n, seed)``; a larger ``n`` extends a smaller one.
"""

from __future__ import annotations

import json
import random
from typing import Callable

CITIES = ["Paris", "Tokyo", "New York", "Berlin", "Sydney", "Cairo", "Toronto", "Mumbai", "Lima",
          "Oslo", "Madrid", "Seoul", "Nairobi", "Chicago", "Rome", "Dublin", "Bangkok", "Denver"]
CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CAD", "AUD", "CHF", "INR", "CNY", "MXN"]
LANGUAGES = ["French", "Spanish", "German", "Japanese", "Italian", "Portuguese", "Korean", "Dutch"]
SYMBOLS = ["AAPL", "MSFT", "GOOGL", "AMZN", "TSLA", "NVDA", "META", "IBM", "ORCL", "INTC"]
PHRASES = ["good morning", "where is the train station", "thank you very much", "see you tomorrow",
           "how much does this cost", "I would like a coffee", "happy birthday", "the bill, please"]
TOPICS = ["best hiking trails in Colorado", "how to bake sourdough bread", "electric car reviews",
          "history of the Roman empire", "beginner python tutorials", "cheap flights to Lisbon",
          "healthy breakfast ideas", "how solar panels work"]
CUISINES = ["italian", "thai", "mexican", "indian", "japanese", "vegan", "greek", "korean"]
MOVIES = ["Inception", "The Matrix", "Spirited Away", "Parasite", "Casablanca", "Alien", "Up",
          "Amelie"]
PEOPLE = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
DOMAINS = ["example.com", "mail.org", "company.net"]
SUBJECTS = ["Meeting moved", "Lunch on Friday", "Quarterly report", "Happy holidays", "Quick question"]
BODIES = ["The meeting is now at 3 pm", "Are you free for lunch?", "Please see the attached numbers",
          "Enjoy the break!", "Can you call me back today?"]
SENTENCES = ["the cat sat on the mat with the other cat", "To be or not to be, that is the question",
             "a rose is a rose is a rose", "The quick brown fox jumps over the lazy dog",
             "one fish two fish red fish blue fish"]
WORDS = ["apple", "river", "stone", "cloud", "maple", "tiger", "lemon", "piano", "orbit", "delta"]


def _p(description: str, type_: str, default=None, has_default: bool = False) -> dict:
    spec = {"description": description, "type": type_}
    if has_default:
        spec["default"] = default
    return spec


def _money(rng: random.Random) -> float:
    if rng.random() < 0.5:
        return float(rng.choice([10, 20, 25, 50, 75, 100, 150, 200, 250, 500, 1000, 1200]))
    return rng.randint(100, 99999) / 100.0


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _int_list(rng: random.Random, lo: int = -20, hi: int = 99) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(rng.randint(3, 6))]


def _pair(rng: random.Random, pool: list[str]) -> tuple[str, str]:
    a, b = rng.sample(pool, 2)
    return a, b


# Each tool: its xlam-format description and query makers rng -> (sentence, arguments).
Maker = Callable[[random.Random], "tuple[str, dict]"]
CATALOGUE: list[tuple[dict, list[Maker]]] = []


def _tool(name: str, description: str, parameters: dict, *makers: Maker) -> None:
    CATALOGUE.append(({"name": name, "description": description, "parameters": parameters}, list(makers)))


def _weather_plain(r):
    c = r.choice(CITIES)
    return f"What's the weather like in {c} right now?", {"location": c}


def _weather_units(r):
    c = r.choice(CITIES)
    return f"Tell me the current weather in {c} in fahrenheit.", {"location": c, "units": "fahrenheit"}


_tool("get_current_weather", "Get the current weather conditions for a city.",
      {"location": _p("The city name, e.g. Paris.", "str"),
       "units": _p("Temperature units, 'celsius' or 'fahrenheit'.", "str, optional", "celsius", True)},
      _weather_plain, _weather_units)


def _forecast(r):
    c, d = r.choice(CITIES), r.randint(2, 10)
    return f"Give me the {d}-day weather forecast for {c}.", {"location": c, "days": d}


_tool("get_weather_forecast", "Get a daily weather forecast for a city.",
      {"location": _p("The city name.", "str"), "days": _p("Number of days to forecast (1-14).", "int")},
      _forecast)


def _convert(r):
    a, b = _pair(r, CURRENCIES)
    x = _money(r)
    return f"Convert {_fmt(x)} {a} to {b}.", {"amount": x, "from_currency": a, "to_currency": b}


def _convert2(r):
    a, b = _pair(r, CURRENCIES)
    x = _money(r)
    return f"How much is {_fmt(x)} {a} in {b}?", {"amount": x, "from_currency": a, "to_currency": b}


_tool("convert_currency", "Convert an amount of money from one currency to another.",
      {"amount": _p("The amount to convert.", "float"),
       "from_currency": _p("ISO code of the source currency, e.g. USD.", "str"),
       "to_currency": _p("ISO code of the target currency, e.g. EUR.", "str")},
      _convert, _convert2)


def _rate(r):
    a, b = _pair(r, CURRENCIES)
    return f"What is the exchange rate from {a} to {b}?", {"base": a, "target": b}


_tool("get_exchange_rate", "Get the latest exchange rate between two currencies.",
      {"base": _p("ISO code of the base currency.", "str"), "target": _p("ISO code of the quote currency.", "str")},
      _rate)


def _bmi(r):
    w = r.randint(450, 1200) / 10.0
    h = r.randint(150, 200) / 100.0
    return (f"My weight is {_fmt(w)} kg and I am {_fmt(h)} m tall. What is my BMI?",
            {"weight_kg": w, "height_m": h})


_tool("calculate_bmi", "Calculate the body mass index.",
      {"weight_kg": _p("Weight in kilograms.", "float"), "height_m": _p("Height in meters.", "float")}, _bmi)


def _prime(r):
    n = r.randint(2, 100000)
    return f"Is {n} a prime number?", {"number": n}


_tool("is_prime", "Check whether an integer is prime.", {"number": _p("The integer to check.", "int")}, _prime)


def _fact(r):
    n = r.randint(0, 20)
    return f"Compute the factorial of {n}.", {"n": n}


_tool("factorial", "Compute the factorial of a non-negative integer.",
      {"n": _p("The non-negative integer.", "int")}, _fact)


def _fib(r):
    n = r.randint(3, 40)
    return f"List the first {n} Fibonacci numbers.", {"n": n}


_tool("fibonacci_sequence", "Return the first n Fibonacci numbers.",
      {"n": _p("How many numbers to return.", "int")}, _fib)


def _max(r):
    xs = _int_list(r)
    return f"What is the largest number in {xs}?", {"numbers": xs}


_tool("find_max", "Find the maximum of a list of integers.", {"numbers": _p("The integers.", "List[int]")}, _max)


def _sort_asc(r):
    xs = _int_list(r)
    return f"Sort the numbers {xs} in ascending order.", {"numbers": xs}


def _sort_desc(r):
    xs = _int_list(r)
    return f"Sort the numbers {xs} from largest to smallest.", {"numbers": xs, "descending": True}


_tool("sort_numbers", "Sort a list of numbers.",
      {"numbers": _p("The numbers to sort.", "List[float]"),
       "descending": _p("Sort from largest to smallest.", "bool, optional", False, True)},
      _sort_asc, _sort_desc)


def _avg(r):
    xs = [r.choice([r.randint(0, 50), r.randint(0, 500) / 10.0]) for _ in range(r.randint(3, 5))]
    xs = [int(x) if float(x).is_integer() else x for x in xs]
    return f"Calculate the average of {xs}.", {"numbers": xs}


_tool("calculate_average", "Calculate the arithmetic mean of a list of numbers.",
      {"numbers": _p("The numbers.", "List[float]")}, _avg)


def _gcd(r):
    a, b = r.randint(2, 500), r.randint(2, 500)
    return f"What is the greatest common divisor of {a} and {b}?", {"a": a, "b": b}


_tool("greatest_common_divisor", "Compute the greatest common divisor of two integers.",
      {"a": _p("The first integer.", "int"), "b": _p("The second integer.", "int")}, _gcd)


def _search(r):
    q = r.choice(TOPICS)
    return f"Search the web for '{q}'.", {"query": q}


def _search_k(r):
    q, k = r.choice(TOPICS), r.randint(3, 20)
    return f"Find {k} web results about '{q}'.", {"query": q, "num_results": k}


_tool("web_search", "Search the web and return the top results.",
      {"query": _p("The search query.", "str"),
       "num_results": _p("How many results to return.", "int, optional", 10, True)},
      _search, _search_k)


def _stock(r):
    s = r.choice(SYMBOLS)
    return f"What's the current price of {s} stock?", {"symbol": s}


_tool("get_stock_price", "Get the latest stock price for a ticker symbol.",
      {"symbol": _p("The ticker symbol, e.g. AAPL.", "str")}, _stock)


def _translate(r):
    t, lang = r.choice(PHRASES), r.choice(LANGUAGES)
    return f"Translate '{t}' into {lang}.", {"text": t, "target_language": lang}


def _translate_src(r):
    t = r.choice(PHRASES)
    a, b = _pair(r, LANGUAGES + ["English"])
    return (f"Translate '{t}' from {a} to {b}.",
            {"text": t, "target_language": b, "source_language": a})


_tool("translate_text", "Translate text into another language.",
      {"text": _p("The text to translate.", "str"),
       "target_language": _p("The language to translate into, e.g. French.", "str"),
       "source_language": _p("The language of the text, or 'auto' to detect it.", "str, optional", "auto", True)},
      _translate, _translate_src)


def _tip(r):
    bill = _money(r)
    pct = float(r.choice([10, 12, 15, 18, 20, 22, 25]))
    return (f"How much should I tip on a bill of {_fmt(bill)} dollars at {_fmt(pct)} percent?",
            {"bill_amount": bill, "tip_percent": pct})


_tool("calculate_tip", "Calculate the tip for a bill.",
      {"bill_amount": _p("The bill amount.", "float"), "tip_percent": _p("The tip in percent, e.g. 15.", "float")},
      _tip)


def _interest(r):
    p, y = float(r.choice([1000, 2500, 5000, 10000, 20000])), r.randint(1, 30)
    rate = r.choice([1, 2, 2.5, 3, 4, 4.5, 5, 6, 7])
    return (f"How much will {_fmt(p)} dollars grow to in {y} years at {_fmt(rate)}% annual interest?",
            {"principal": p, "annual_rate": round(rate / 100, 6), "years": y})


def _interest_n(r):
    text, args = _interest(r)
    word, n = r.choice([("monthly", 12), ("quarterly", 4), ("daily", 365)])
    return text[:-1] + f", compounded {word}?", dict(args, compounds_per_year=n)


_tool("compound_interest", "Compute the final balance of an investment with compound interest.",
      {"principal": _p("The initial amount.", "float"),
       "annual_rate": _p("The annual interest rate as a decimal (0.05 for 5%).", "float"),
       "years": _p("The number of years.", "int"),
       "compounds_per_year": _p("How many times interest is compounded per year.", "int, optional", 1, True)},
      _interest, _interest_n)


def _restaurants(r):
    c, cu = r.choice(CITIES), r.choice(CUISINES)
    return f"Find {cu} restaurants in {c}.", {"city": c, "cuisine": cu}


def _restaurants_k(r):
    c, cu, k = r.choice(CITIES), r.choice(CUISINES), r.randint(2, 15)
    return f"Show me {k} {cu} restaurants in {c}.", {"city": c, "cuisine": cu, "max_results": k}


_tool("search_restaurants", "Search restaurants by city and cuisine.",
      {"city": _p("The city.", "str"), "cuisine": _p("The cuisine, e.g. italian.", "str"),
       "max_results": _p("The maximum number of results.", "int, optional", 5, True)},
      _restaurants, _restaurants_k)


def _tz(r):
    c = r.choice(CITIES)
    return f"Which time zone is {c} in?", {"city": c}


_tool("get_time_zone", "Get the IANA time zone of a city.", {"city": _p("The city name.", "str")}, _tz)


def _email(r):
    to = f"{r.choice(PEOPLE)}@{r.choice(DOMAINS)}"
    s, b = r.choice(SUBJECTS), r.choice(BODIES)
    return (f"Send an email to {to} with the subject '{s}' and the message '{b}'.",
            {"to": to, "subject": s, "body": b})


_tool("send_email", "Send an email.",
      {"to": _p("The recipient's address.", "str"), "subject": _p("The subject line.", "str"),
       "body": _p("The message text.", "str")}, _email)


def _count(r):
    t = r.choice(SENTENCES)
    w = r.choice(t.lower().split()).strip(",")
    return f"How many times does the word '{w}' appear in '{t}'?", {"text": t, "word": w}


def _count_cs(r):
    t = r.choice(SENTENCES)
    w = r.choice(t.split())
    w = w.strip(",")
    return (f"Count the case-sensitive occurrences of '{w}' in '{t}'.",
            {"text": t, "word": w, "case_sensitive": True})


_tool("count_word_occurrences", "Count how often a word occurs in a text.",
      {"text": _p("The text.", "str"), "word": _p("The word to count.", "str"),
       "case_sensitive": _p("Match case exactly.", "bool, optional", False, True)},
      _count, _count_cs)


def _movie(r):
    t = r.choice(MOVIES)
    return f"Tell me about the movie '{t}'.", {"title": t}


def _movie_year(r):
    t, y = r.choice(MOVIES), r.randint(1940, 2024)
    return f"Look up details of the {y} movie '{t}'.", {"title": t, "year": y}


_tool("get_movie_details", "Get details about a movie.",
      {"title": _p("The movie title.", "str"),
       "year": _p("The release year, to tell remakes apart.", "int, optional", None, True)},
      _movie, _movie_year)


def _flight(r):
    code = f"{r.choice(['AA', 'BA', 'LH', 'AF', 'DL', 'UA', 'QF'])}{r.randint(10, 9999)}"
    date = f"2024-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}"
    return f"Is flight {code} on {date} on time?", {"flight_number": code, "date": date}


_tool("get_flight_status", "Get the status of a flight on a date.",
      {"flight_number": _p("The flight number, e.g. BA117.", "str"),
       "date": _p("The date, YYYY-MM-DD.", "str")}, _flight)


def _temp(r):
    v = float(r.choice([r.randint(-40, 120), r.randint(-400, 1200) / 10.0]))
    a, b = _pair(r, ["celsius", "fahrenheit", "kelvin"])
    return f"Convert {_fmt(v)} degrees {a} to {b}.", {"value": v, "from_unit": a, "to_unit": b}


_tool("convert_temperature", "Convert a temperature between units.",
      {"value": _p("The temperature.", "float"),
       "from_unit": _p("'celsius', 'fahrenheit' or 'kelvin'.", "str"),
       "to_unit": _p("'celsius', 'fahrenheit' or 'kelvin'.", "str")}, _temp)


def _join(r):
    ws = r.sample(WORDS, r.randint(2, 4))
    sep = r.choice(["-", "_", ", ", "/"])
    return f"Join the words {json.dumps(ws)} using the separator '{sep}'.", {"words": ws, "separator": sep}


def _join_default(r):
    ws = r.sample(WORDS, r.randint(2, 4))
    return f"Join the words {json.dumps(ws)} into one string.", {"words": ws}


_tool("join_words", "Join words into a single string.",
      {"words": _p("The words.", "List[str]"),
       "separator": _p("The separator placed between words.", "str, optional", " ", True)},
      _join, _join_default)


def _leap(r):
    y = r.randint(1600, 2400)
    return f"Is {y} a leap year?", {"year": y}


_tool("is_leap_year", "Check whether a year is a leap year.", {"year": _p("The year.", "int")}, _leap)


_JOINERS = [" ", " Also, ", " And ", " Then "]


def _join_sentences(rng: random.Random, sentences: list[str]) -> str:
    out = sentences[0]
    for s in sentences[1:]:
        j = rng.choice(_JOINERS)
        out += j + (s[0].lower() + s[1:] if j.strip() else s)
    return out


def synthetic_record(rng: random.Random, idx: int) -> dict:
    """One synthetic xlam-format record."""
    k = rng.choices([1, 2, 3], weights=[6, 3, 1])[0]
    same_tool = k > 1 and rng.random() < 0.4
    if same_tool:
        picks = [rng.randrange(len(CATALOGUE))] * k
    else:
        picks = rng.sample(range(len(CATALOGUE)), k)
    sentences, calls = [], []
    for t in picks:
        tool, makers = CATALOGUE[t]
        for _ in range(20):  # avoid the exact same call twice in one query
            text, args = rng.choice(makers)(rng)
            call = {"name": tool["name"], "arguments": args}
            if call not in calls:
                break
        sentences.append(text)
        calls.append(call)
    used = sorted(set(picks))
    others = [i for i in range(len(CATALOGUE)) if i not in used]
    tools = used + rng.sample(others, rng.randint(0, 3))
    rng.shuffle(tools)
    return {
        "id": idx,
        "query": _join_sentences(rng, sentences),
        "answers": json.dumps(calls, ensure_ascii=False),
        "tools": json.dumps([CATALOGUE[i][0] for i in tools], ensure_ascii=False),
    }


def synthetic_xlam(n: int, seed: int = 0) -> list[dict]:
    """``n`` SYNTHETIC records in the xlam-function-calling-60k format (ids 0..n-1); record ``i``
    depends only on ``(seed, i)``."""
    return [synthetic_record(random.Random(f"xlam-synthetic:{seed}:{i}"), i) for i in range(n)]
