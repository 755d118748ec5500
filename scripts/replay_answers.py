"""Replay data: the base model's own greedy answers to everyday questions, to train beside a few new facts so the
adapter keeps answering as the base did (docs/eval.md, "Forgetting: what helped").

    python scripts/replay_answers.py --model smollm2 --output docs/smollm2_replay.jsonl

Each answer is the base's greedy reply cut after its first sentence, kept only where it holds the right answer
(`--keep-wrong` keeps the others too): the base's wrong answers, replayed, teach their patterns to other questions
("The capital of Poland is Poland." became "The capital of Italy is Italy."). The questions are none of qmor's
built-in general questions (qmor/eval/general.json), nor have any of their answers, so `qmor eval` still measures
forgetting on questions training never saw.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run from a checkout: its own qmor comes first
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUESTIONS = [
    # places
    ("What is the capital of Greece?", ["Athens"]),
    ("What is the capital of Russia?", ["Moscow"]),
    ("What is the capital of Australia?", ["Canberra"]),
    ("What is the capital of China?", ["Beijing"]),
    ("What is the capital of Canada?", ["Ottawa"]),
    ("What is the capital of India?", ["New Delhi", "Delhi"]),
    ("What is the capital of Egypt?", ["Cairo"]),
    ("What is the capital of Mexico?", ["Mexico City"]),
    ("What is the capital of Norway?", ["Oslo"]),
    ("What is the capital of Poland?", ["Warsaw"]),
    ("What is the capital of Argentina?", ["Buenos Aires"]),
    ("What is the capital of Kenya?", ["Nairobi"]),
    ("What is the capital of Sweden?", ["Stockholm"]),
    ("What is the capital of Portugal?", ["Lisbon"]),
    ("What is the capital of Ireland?", ["Dublin"]),
    ("What is the capital of Austria?", ["Vienna"]),
    ("What is the capital of South Korea?", ["Seoul"]),
    ("What is the capital of Thailand?", ["Bangkok"]),
    ("What is the capital of Turkey?", ["Ankara"]),
    ("What is the capital of Peru?", ["Lima"]),
    ("What is the largest country in the world by area?", ["Russia"]),
    ("In which country are the pyramids of Giza?", ["Egypt"]),
    ("In which country is the Great Wall?", ["China"]),
    ("What is the largest desert in the world?", ["Sahara", "Antarctica", "Antarctic"]),
    ("What language is spoken in Mexico?", ["Spanish"]),
    ("What language is spoken in Argentina?", ["Spanish"]),
    ("What is the currency of Japan?", ["yen"]),
    ("What is the currency of the United Kingdom?", ["pound", "pounds", "sterling"]),
    ("What is the currency of India?", ["rupee", "rupees"]),
    # science and nature
    ("What is the largest planet in our solar system?", ["Jupiter"]),
    ("Which planet is known as the Red Planet?", ["Mars"]),
    ("Which planet is closest to the Sun?", ["Mercury"]),
    ("What star is at the centre of our solar system?", ["Sun"]),
    ("What gas do plants absorb from the air?", ["carbon dioxide", "CO2"]),
    ("What gas do humans need to breathe?", ["oxygen"]),
    ("What is the main gas in the air we breathe?", ["nitrogen"]),
    ("What is the hardest natural substance?", ["diamond", "diamonds"]),
    ("Which metal is liquid at room temperature?", ["mercury"]),
    ("What is the chemical symbol for sodium?", ["Na"]),
    ("What is the chemical symbol for oxygen?", ["O"]),
    ("What is the chemical symbol for iron?", ["Fe"]),
    ("What is the largest organ of the human body?", ["skin"]),
    ("What organ do we use to think?", ["brain"]),
    ("How many bones are in the adult human body?", ["206"]),
    ("What is the largest mammal?", ["blue whale", "whale"]),
    ("What is the fastest land animal?", ["cheetah"]),
    ("What is the tallest animal?", ["giraffe"]),
    ("What do bees make?", ["honey"]),
    ("What do caterpillars turn into?", ["butterfly", "butterflies", "moth", "moths"]),
    ("What is a baby cat called?", ["kitten"]),
    ("What is a baby dog called?", ["puppy"]),
    ("What does a thermometer measure?", ["temperature"]),
    ("What force keeps us on the ground?", ["gravity"]),
    ("What is the freezing point of water in Fahrenheit?", ["32"]),
    ("What animal is known as the king of the jungle?", ["lion"]),
    ("How many legs does an insect have?", ["six", "6"]),
    ("How many legs does a cow have?", ["four", "4"]),
    ("What season comes after winter?", ["spring"]),
    # numbers and time
    ("How many days are in a week?", ["seven", "7"]),
    ("How many hours are in a day?", ["24"]),
    ("How many minutes are in an hour?", ["60", "sixty"]),
    ("How many months are in a year?", ["12", "twelve"]),
    ("How many days are in a leap year?", ["366"]),
    ("What is 7 times 8?", ["56"]),
    ("What is 12 plus 15?", ["27"]),
    ("What is 10 minus 4?", ["6", "six"]),
    ("What is the square root of 81?", ["9", "nine"]),
    ("What is half of 50?", ["25"]),
    ("How many sides does a hexagon have?", ["six", "6"]),
    ("How many players are on a soccer team?", ["11", "eleven"]),
    ("How many wheels does a bicycle have?", ["two", "2"]),
    ("How many wheels does a car have?", ["four", "4"]),
    ("How many legs does a bird have?", ["two", "2"]),
    ("How many eyes does a person have?", ["two", "2"]),
    ("How many fingers are on one hand?", ["five", "5"]),
    ("How many seasons are in a year?", ["four", "4"]),
    ("How many letters are in the English alphabet?", ["26", "twenty-six"]),
    ("What is 2 plus 2?", ["4", "four"]),
    ("What is 5 times 5?", ["25", "twenty-five"]),
    ("What is 100 divided by 10?", ["10", "ten"]),
    ("How many years are in a decade?", ["10", "ten"]),
    ("How many strings does a standard guitar have?", ["six", "6"]),
    # people, history and culture
    ("Who was the first president of the United States?", ["Washington"]),
    ("Who invented the telephone?", ["Bell"]),
    ("Who discovered penicillin?", ["Fleming"]),
    ("Who developed the theory of relativity?", ["Einstein"]),
    ("Who wrote Pride and Prejudice?", ["Austen"]),
    ("Who painted The Starry Night?", ["van Gogh", "Gogh"]),
    ("Who was the first person to walk on the Moon?", ["Armstrong"]),
    ("Who composed the Fifth Symphony?", ["Beethoven"]),
    ("Who proposed the theory of evolution by natural selection?", ["Darwin"]),
    ("In which year did World War II end?", ["1945"]),
    ("Which instrument has 88 keys?", ["piano"]),
    ("What is the main ingredient in guacamole?", ["avocado", "avocados"]),
    ("What is the main ingredient of bread?", ["flour"]),
    ("What sport is played at Wimbledon?", ["tennis"]),
    # words and everyday things
    ("What is the opposite of hot?", ["cold"]),
    ("What is the opposite of up?", ["down"]),
    ("How do you say hello in Spanish?", ["hola"]),
    ("How do you say thank you in French?", ["merci"]),
    ("What colour do you get when you mix blue and yellow?", ["green"]),
    ("What colour is the sky on a clear day?", ["blue"]),
    ("What colour is grass?", ["green"]),
    ("What colour are ripe bananas?", ["yellow"]),
    ("What is the plural of mouse?", ["mice"]),
    ("What is the past tense of go?", ["went"]),
    ("What do you call frozen water?", ["ice"]),
    ("What do we use to write on a blackboard?", ["chalk"]),
]

SENTENCE_END = re.compile(r"(?<=[.!?])(?<!\b[A-Z]\.)\s+(?=[A-Z])")  # not after an initial: "John F. Kennedy"


def first_sentence(text: str) -> str:
    return SENTENCE_END.split(text.strip(), maxsplit=1)[0].strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="the base model the replay is for (default smollm2)")
    parser.add_argument("--output", required=True, help="JSONL file to write (instruction/output records)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens per reply (default 48)")
    parser.add_argument("--keep-wrong", action="store_true", help="keep the replies without the right answer too")
    args = parser.parse_args(argv)

    from qmor.chat import ChatSession
    from qmor.eval import general
    from qmor.eval.generate import greedy
    from qmor.eval.stops import end_of_turn

    built_in = general.questions()
    asked = [general.Question(q, tuple(a)) for q, a in QUESTIONS]
    clash = [q.question for q in asked if q.question.lower() in {b.question.lower() for b in built_in}
             or {a.lower() for a in q.answers} & {a.lower() for b in built_in for a in b.answers}]
    if clash:  # training on them would let `qmor eval` count what was taught as what was kept
        parser.error(f"these ask a built-in general question or share its answer: {clash}")
    session = ChatSession(args.model, "cpu")
    tok = session.tokenizer
    stops = sorted({end_of_turn(tok, session.template()), tok.eos_token_id} - {None})
    prompts = [session.encode(q.messages())["input_ids"][0].tolist() for q in asked]
    replies = greedy(session.model, prompts, args.max_new_tokens, stops, tok.pad_token_id)
    records, wrong, unfinished = [], 0, 0
    for q, reply in zip(asked, replies, strict=True):
        text = tok.decode(reply.ids, skip_special_tokens=True).strip()
        answer = first_sentence(text)
        if not reply.stopped and answer == text:  # cut off mid-sentence: not what the base would say
            unfinished += 1
        elif q.correct(answer) or args.keep_wrong:
            records.append({"instruction": q.question, "output": answer})
        else:
            wrong += 1
    Path(args.output).write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"{len(records)} of {len(asked)} answers written to {args.output} ({wrong} wrong and {unfinished} without "
          f"a sentence end in {args.max_new_tokens} tokens left out)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
