"""A small instruction set written for the examples (the tutorials' datasets cannot be downloaded here).

Each record has the Databricks Dolly fields the LoRA tutorial reads.
"""

RECORDS = [
    {"instruction": "What should I pack for a day at the beach?",
     "response": "Sunscreen, a towel, water, a hat and a book."},
    {"instruction": "Give me a name for a grey cat.", "response": "Smokey."},
    {"instruction": "How do I boil an egg?",
     "response": "Put the egg in boiling water for nine minutes, then cool it in cold water."},
    {"instruction": "What is the capital of France?", "response": "Paris."},
    {"instruction": "Name three colours of the rainbow.", "response": "Red, green and violet."},
    {"instruction": "How many legs does a spider have?", "response": "Eight."},
    {"instruction": "Suggest a short morning routine.",
     "response": "Drink a glass of water, stretch for five minutes and eat breakfast."},
    {"instruction": "What is two plus three?", "response": "Five."},
    {"instruction": "Why do leaves turn red in autumn?",
     "response": "The green chlorophyll fades and red pigments show."},
    {"instruction": "Write a greeting for a birthday card.",
     "response": "Happy birthday! Wishing you a year full of joy."},
    {"instruction": "What should I do on a trip to Europe?",
     "response": "Visit old towns, try the local food and travel by train between cities."},
    {"instruction": "Which animal is known as the king of the jungle?", "response": "The lion."},
]

REVIEWS = [
    "A warm, funny film with a cast that clearly enjoyed every scene.",
    "The plot drags in the middle, but the ending makes up for it.",
    "I laughed from start to finish; the best comedy I have seen this year.",
    "Beautiful pictures, weak story, and far too long.",
    "A clever script and sharp jokes: watch it with friends.",
    "The actors try hard, yet the film never finds its rhythm.",
    "Charming and light, a perfect film for a rainy Sunday.",
    "Predictable from the first minute, but still fun to watch.",
]
