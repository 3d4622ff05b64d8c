"""Prompt templates: one place for the text a model sees, shared by lm-eval and the evaluator.

The layout follows the Open Portuguese LLM Leaderboard (``Pergunta:`` / ``Alternativas:`` /
``Resposta correta:``, answers as `` <letter>``, shots joined by a blank line), with our own
task descriptions. :func:`build_context` reproduces lm-eval's plain-text few-shot context
(description + shots + question, no chat template) character for character, so the resident
evaluator and ``lm_eval --include_path`` score the same strings.
"""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks_ptbr.items import Item

TARGET_DELIMITER = " "      # between "Resposta correta:" and the letter (lm-eval's default)
FEWSHOT_DELIMITER = "\n\n"  # after each answered shot (lm-eval's default)
GEN_MAX_TOKENS = 32     # the Leaderboard's OAB setting; enough for "Resposta: X" and some slack
GEN_UNTIL = ("\n\n",)   # the Leaderboard stops at the few-shot delimiter

_RESPONDA = "Selecione a única alternativa correta e responda apenas com a letra correspondente."
DESCRIPTIONS: dict[str, str] = {
    "legal": "As perguntas a seguir são questões de múltipla escolha de direito brasileiro, "
             f"no estilo do Exame de Ordem da OAB. {_RESPONDA}\n\n",
    "health": "As perguntas a seguir são questões de múltipla escolha de medicina e saúde "
              f"pública no Brasil. {_RESPONDA}\n\n",
    "enem": "As perguntas a seguir são questões de múltipla escolha do Exame Nacional do "
            f"Ensino Médio (ENEM). {_RESPONDA}\n\n",
    "healthbench": "As afirmações a seguir tratam de protocolos clínicos do Ministério da "
                   "Saúde. Responda A se a afirmação for verdadeira ou B se for falsa.\n\n",
}

# The Leaderboard calls an OAB item "Questão" and an ENEM item "Pergunta"; we keep that.
_HEADERS = {"legal": "Questão:", "healthbench": "Afirmação:"}


def format_query(item: Item, domain: str) -> str:
    """The question with its lettered options, ending where the answer letter goes."""
    header = _HEADERS.get(domain, "Pergunta:")
    options = "\n".join(f"{label}. {text}" for label, text in zip(item.labels, item.texts))
    return f"{header}\n{item.question}\nAlternativas:\n{options}\nResposta correta:"


def build_context(domain: str, shots: Sequence[Item], item: Item, *,
                  description: str | None = None) -> str:
    """Description, answered shots, then the unanswered question (lm-eval's plain-text form)."""
    parts = [DESCRIPTIONS[domain] if description is None else description]
    for shot in shots:
        parts.append(format_query(shot, domain) + TARGET_DELIMITER + shot.answer + FEWSHOT_DELIMITER)
    parts.append(format_query(item, domain))
    return "".join(parts)


def build_messages(domain: str, shots: Sequence[Item], item: Item, *,
                   description: str | None = None) -> list[dict[str, str]]:
    """The same prompt as chat turns, as lm-eval builds it for ``--apply_chat_template
    --fewshot_as_multiturn``: the description is the system turn, each shot a user turn (the
    question) and an assistant turn (its letter), then the question as the last user turn."""
    text = DESCRIPTIONS[domain] if description is None else description
    messages = [{"role": "system", "content": text}] if text else []
    for shot in shots:
        messages.append({"role": "user", "content": format_query(shot, domain)})
        messages.append({"role": "assistant", "content": shot.answer})
    messages.append({"role": "user", "content": format_query(item, domain)})
    return messages
