"""Document filters of the offline lm-evaluation-harness tasks in this folder (named by their YAMLs' !function)."""


def whole_sonnets(dataset):
    """The sonnets only: the text builder's paragraphs also hold the title and each sonnet's Roman numeral."""
    return dataset.filter(lambda doc: doc["text"].strip().count("\n") >= 8)
