"""PII guard for everything an LLM writes into a release.

Finds direct identifiers in free text (person names, addresses, phone numbers, e-mail
addresses, national and hospital ID numbers, hospital names) and high-sensitivity content
(sexually transmitted disease, pregnancy). Identifiers are always replaced by obviously
synthetic placeholders ("[NAME]", "[PHONE]", ...). Sensitive content carries a tier (the
dictionary's tiers: 3 = highly sensitive); content above the consortium's `text_max_tier`
is replaced by "[SENSITIVE:<category>]", the rest is kept and counted.

Rule-based on purpose: deterministic, explainable, no model download. It is tuned for
clinical notes in English with common German, French, Spanish, Italian and Dutch forms;
precision/recall on a labelled set are in docs/llm.md (`python -m ppsehr.server.llm.pii EVAL.jsonl`).
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

IDENTIFIERS = ("EMAIL", "ID", "PHONE", "ADDRESS", "HOSPITAL", "NAME")
SENSITIVE_TIERS = {"STD": 3, "PREGNANCY": 3}
LABELS = IDENTIFIERS + tuple(SENSITIVE_TIERS)
DEFAULT_TEXT_MAX_TIER = 2


@dataclass(frozen=True)
class Finding:
    start: int
    end: int
    label: str
    text: str

    @property
    def tier(self) -> int | None:
        return SENSITIVE_TIERS.get(self.label)


# ----------------------------------------------------------------------------- word lists
_U = "A-ZÀ-ÖØ-ÞĀ-Ž"  # upper-case letters (Latin-1 + Latin Extended-A)
_L = "a-zß-öø-ÿā-ž"
CAP = rf"[{_U}][{_L}'’]+(?:-[{_U}{_L}][{_L}'’]+)?"  # a capitalised word, hyphenated allowed (Min-ji, Al-Farsi)
CAP_OR_OPREFIX = rf"(?:[{_U}]'[{_U}][{_L}]+|{CAP})"  # O'Neill, D'Angelo

FIRST_NAMES = set("""
aaron abdul adam adrian ahmed aisha alan albert alejandro alessandro alex alexander alexandra alice
alicia alina ali amara amelia amir amy ana andrea andreas andrew angela anna anne anika antoine
antonio arjun arthur astrid ayesha barbara beatriz ben benjamin bernard bianca brian bruno camille
carla carlos carmen caroline catherine charles charlotte chen chiara chloe christian christina
christine christopher claire claudia daniel daniela david deborah diana diego dimitri dmitri
dolores dominic edward elena elif elisa elizabeth ella emilia emily emma enrique eric erik esther
eva fatima felix fernando fiona francesca francesco francisco franz fran françois gabriel gabriela
george georg giovanni giulia giuseppe greta gunther hannah hans harry hassan heinrich helen helena
henrik henry hiroshi hugo ibrahim ines ingrid irene isabel isabella ivan jacob james jan jana jane
javier jean jennifer jessica joan joanna johann johannes john jonas jorge josé joseph juan julia
julian juliette jürgen karen karim katarzyna katharina kathrin kenji kevin klaus laura lars laurent
lea leila lena leon linda lisa liu lorenzo louis lucas lucia luis luisa lukas magdalena manuel
marco margaret maria marie marina mario marta martin mary matteo matthew maximilian mehmet mia
michael michel michelle miguel mohammed muhammad nadia natalia nicolas nikolai noah nora olga
oliver olivia omar pablo paolo patricia paul paula pedro peter petra philippe pierre piotr priya
rachel rafael rahul ramon raphael rebecca ricardo richard robert roberto rosa ruth samir samuel
sandra sara sarah sebastian sergei simon sofia sophie stefan stefano stephanie susan sven tanaka
thomas tobias tomás ursula valentina vera victor viktor vincent wei william wolfgang xavier yara
yusuf zainab zoe olga kwame chidi ngozi oluwaseun thabo wanjiru haruto yuki sakura min-jun ji-woo
arun deepa sanjay anil fatou moussa
""".split())
# First names that are also ordinary words, months or places: names only with more evidence.
AMBIGUOUS_FIRST = set("""
will grace hope mark bill may june april august rose frank joy summer jordan austin faith dawn
amber iris ruby art sunny lane chase hunter baker house page nick pat sue don jack max guy ray
rich bob gene sandy angel chance victoria florence georgia lourdes paris sydney carol holly
""".split())
FIRST_NAMES |= AMBIGUOUS_FIRST

# Words after a capitalised pair that make it a medical eponym, not a person.
EPONYM_NEXT = set("""
murmur sign signs syndrome disease disorder spots spot protocol criteria criterion test maneuver
manoeuvre reflex phenomenon pattern block node nodes score scale classification equation formula
triad wave waves bundle fracture cyst lesion lesions ulcer index procedure operation shunt catheter
""".split())
EPONYMS = set("""
parkinson down crohn hodgkin alzheimer wolff white bruce estes holter austin flint roth osler
janeway quincke kussmaul cheyne stokes adams korotkoff levine framingham duke killip wells
valsalva baker graves addison cushing kawasaki marfan raynaud takotsubo brugada wenckebach mobitz
""".split())

PARTICLE = r"(?:van|von|der|den|de|da|di|du|del|della|le|la|ten|ter|bin|ibn|al|el)"
TITLE = r"(?:Dr|Mr|Mrs|Ms|Miss|Mx|Prof|Sr|Sra|Srta|Herr|Frau|Mme|Mlle|Dott|Dra)"
RELATION = (r"(?:patient|named|name|contact person|emergency contact|next of kin|daughter|son|husband|wife|"
            r"partner|neighbou?r|brother|sister|mother|father|friend|caregiver|patientin|patiente|paciente|paziente|"
            r"(?:\d+-year-old\s+)?(?:man|woman|gentleman|lady|boy|girl))")
VERBS_AFTER_NAME = set("""
was is has had denies denied reports reported presented presents declined declines complains complained
underwent arrived called says said states stated admits admitted agreed refused returned walked describes
described notes noted feels felt smokes smoked works worked lives lived takes took
""".split())

STREET_EN = (r"(?:Street|St\.?|Avenue|Ave\.?|Road|Rd\.?|Lane|Ln\.?|Boulevard|Blvd\.?|Drive|Way|Court|Ct\.?|Place|"
             r"Terrace|Grove|Close|Crescent|Square|Row|Parkway|Highway|Gardens|Mews|Walk)")
STREET_EN_NONUM = r"(?:Street|Avenue|Road|Lane|Boulevard|Drive|Terrace|Grove|Crescent|Square|Parkway|Highway)"
STREET_SUFFIX_DE_NL = r"(?:straße|strasse|str\.|weg|gasse|platz|allee|ring|damm|ufer|straat|laan|gracht|plein|kade)"
STREET_FR = r"(?:rue|avenue|boulevard|bd|place|chemin|allée|impasse|quai|route|cours)"
STREET_ES_IT = r"(?:Calle|Avenida|Av\.|Plaza|Paseo|Carrer|Rua|Via|Viale|Piazza|Corso|Largo|Vicolo)"

HOSPITAL_SUFFIX = (r"(?:Hospital|Medical Cent(?:er|re)|Clinic|Infirmary|Health System|Heart Institute|"
                   r"Institute of [A-Z][a-z]+|Hospitals|Health Cent(?:er|re)|Spital|Klinik|Krankenhaus)")
HOSPITAL_PREFIX = (r"(?:University Hospital|Universitätsspital|Universitätsklinikum|Uniklinik|Klinikum|Kantonsspital|"
                   r"Krankenhaus|Hôpital|Hopital|Hospital Universitario|Hospital|Ospedale|Policlinico|Clinique|Clínica|"
                   r"Centre Hospitalier|CHU|Ziekenhuis|Academisch Ziekenhuis)")
KNOWN_HOSPITALS = ("Charité", "Karolinska", "Pitié-Salpêtrière", "Salpêtrière", "Gemelli", "Bellvitge",
                   "Erasmus MC", "Inselspital", "Rigshospitalet", "Mayo Clinic", "Cleveland Clinic", "Johns Hopkins",
                   "Mount Sinai", "Cedars-Sinai", "Great Ormond Street", "Addenbrooke's", "Papworth", "Sahlgrenska",
                   "Hadassah", "Sheba", "Vall d'Hebron", "La Paz", "Gregorio Marañón", "Policlinico Gemelli")

ID_KEYWORDS = (r"(?:SSN|social security(?: number| no\.?)?|national insurance(?: number| no\.?)?|NINO|NHS(?: number| no\.?)?|"
               r"s[ée]curit[ée] sociale|num[ée]ro de s[ée]curit[ée] sociale|NIR|Steuer-?ID|Steueridentifikationsnummer|"
               r"Versichertennummer|Krankenversichertennummer|DNI|NIE|NIF|codice fiscale|tessera sanitaria|AHV(?:-Nummer)?|"
               r"AVS|BSN|burgerservicenummer|MRN|medical record(?: number| no\.?)?|hospital (?:number|no\.?)|"
               r"patient (?:ID|number|no\.?)|ID card(?: number| no\.?)?|passport(?: number| no\.?)?|Medicare(?: number| no\.?)?|"
               r"Medicaid(?: number)?|insurance (?:ID|number)|member ID|health card|personnummer|personal identity number|"
               r"PESEL|CPR(?:-nummer)?|Sozialversicherungsnummer|SVNR|AMKA|henkilötunnus|fødselsnummer|"
               r"record (?:no\.?|number)|chart (?:no\.?|number)|case (?:no\.?|number)|ID)")

STD_TERMS = (r"(?:chlamydia(?:\s+trachomatis)?|gonorrh?o?ea|gonorrh?oe|gonorrhoea|gonorrhea|syphilis|s[íi]filis|sifilide|lues|"
             r"HIV(?:-[12])?|AIDS|VIH|herpes\s+genitalis|genital\s+herpes|HSV-2|HPV|human\s+papillomavirus|"
             r"trichomon(?:iasis|as(?:\s+vaginalis)?)|mycoplasma\s+genitalium|condylomat?a?(?:\s+acuminat[ae])?|"
             r"sexually\s+transmitted\s+(?:infections?|diseases?)|STIs?|STDs?|sexual\s+health\s+clinic|"
             r"sexuell\s+übertragbare?\w*(?:\s+(?:Infektion|Krankheit)\w*)?|Geschlechtskrankheit\w*|"
             r"infections?\s+sexuellement\s+transmissibles?|IST|ITS|enfermedad(?:es)?\s+de\s+transmisi[óo]n\s+sexual|"
             r"clamidia|gonorrea|soa|(?:non-)?gonococc\w*(?:\s+urethritis)?|chancroid|lymphogranuloma\s+venereum|"
             r"venereal\s+\w+|HIV\s+PrEP|PrEP)")
PREGNANCY_TERMS = (r"(?:pregnan(?:t|cy|cies)|gravid(?:a|ity)?(?:\s*\d+(?:\s*,?\s*para\s*\d+)?)?|G\d+\s*P\d+|primigravida|"
                   r"multigravida|(?:first|second|third|1st|2nd|3rd)\s+trimester|trimester|gestation(?:al)?|prenatal|"
                   r"antenatal|postpartum|post-partum|peripartum|puerper(?:al|ium)|obstetric(?:al)?|"
                   r"(?:beta|β)-?hCG(?:\s+(?:positive|pos\.?))?|hCG\s+positive|"
                   r"schwanger(?:schaft)?|Schwangerschaft|enceinte|grossesse|embarazada|embarazo|incinta|gravidanza|"
                   r"zwanger(?:schap)?|(?:pre-?)?eclampsia|HELLP|miscarriage|stillbirth|abortion|ectopic|"
                   r"in\s+vitro\s+fertili[sz]ation|IVF|breast-?feeding|lactating|lactation|(?:c(?:a)?esarean|C-)\s?section|"
                   r"Trimenon|Schwangerschaftswoche|SSW|Fehlgeburt|fausse\s+couche|aborto)")

PLACEHOLDER = {label: f"[{label}]" for label in IDENTIFIERS}


def _rx(pattern: str, flags: int = 0) -> re.Pattern:
    return re.compile(pattern, flags)


_EMAIL = _rx(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_ID_FORMATS = [
    _rx(r"\b\d{3}-\d{2}-\d{4}\b"),  # US SSN
    _rx(r"\b756\.\d{4}\.\d{4}\.\d{2}\b"),  # Swiss AHV/AVS
    _rx(r"\b[A-Z]{6}\d{2}[A-EHLMPR-T]\d{2}[A-Z]\d{3}[A-Z]\b"),  # Italian codice fiscale
    _rx(r"\b[12]\s?\d{2}\s?(?:0[1-9]|1[0-2]|[2-9]\d)\s?(?:\d{2}|2[AB])\s?\d{3}\s?\d{3}(?:\s?\d{2})\b"),  # French NIR
    _rx(r"\b(?!BG|GB|NK|KN|TN|NT|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]\s?\d{2}\s?\d{2}\s?\d{2}\s?[A-D]\b"),  # UK NINO
    _rx(r"\b[XYZ]?\d{7,8}-?[A-HJ-NP-TV-Z]\b"),  # Spanish DNI / NIE
    _rx(r"\b\d[A-Z][A-Z\d]\d-?[A-Z][A-Z\d]\d-?[A-Z]{2}\d{2}\b"),  # US Medicare MBI
]
_ID_CONTEXT = _rx(ID_KEYWORDS + r"(?:\s+(?-i:[a-z]{1,5})\b){0,3}(?:\s*(?:no\.?|nr\.?|n°|number|nummer|numéro|#|lautet|is|:|-)\s*){0,3}\s*"
                  r"(?P<value>(?-i:(?=[A-Z0-9.\- ]*\d)[A-Z0-9][A-Z0-9.\-]*(?:\s[A-Z0-9][A-Z0-9.\-]*){0,7}))", re.IGNORECASE)
_PHONE = _rx(r"(?<![\w./-])(?:\+|00)?\(?\d[\d\s().-]{5,20}\d(?![\w/])")
_PHONE_CONTEXT = _rx(r"(?i)\b(?:tel|telephone|phone|mobile|cell|fax|call|reach|contact|telefon|telefono|téléphone|"
                     r"portable|handy|whatsapp|ring)\b")
_DATE = _rx(r"^\d{1,4}[./-]\d{1,2}[./-]\d{1,4}$")
_ADDRESS = [
    # 221B Baker Street / 1600 Pennsylvania Avenue NW
    _rx(rf"\b\d{{1,5}}[A-Za-z]?,?\s+(?:{CAP}\s+){{0,3}}{CAP}\s+{STREET_EN}(?:\s+(?:NW|NE|SW|SE|N|S|E|W)\b)?"),
    # Baker Street (no number)
    _rx(rf"\b(?:{CAP}\s+){{0,2}}{CAP}\s+{STREET_EN_NONUM}\b"),
    # Hauptstraße 12 / Kerkstraat 5
    _rx(rf"\b[{_U}][{_L}]*{STREET_SUFFIX_DE_NL}\s+\d{{1,4}}\s?[a-z]?\b"),
    # 5 rue Victor Hugo / Rue de la Paix
    _rx(rf"(?:\b\d{{1,4}}(?:\s?(?:bis|ter))?,?\s+)?\b(?i:{STREET_FR})\s+(?:(?:de|du|des|la|le|d'|l')\s+|(?:d'|l'))*"
        rf"{CAP}(?:[\s-]+{CAP})*"),
    # Calle Mayor 15 / Via Roma 12
    _rx(rf"\b{STREET_ES_IT}\s+(?:(?:de|del|della|di|dei|la)\s+)*{CAP}(?:\s+{CAP})*(?:,?\s*\d{{1,4}})?"),
    # UK postcode
    _rx(r"\b[A-Z]{1,2}\d[A-Z\d]?\s?\d[A-Z]{2}\b"),
]
# What may follow a street to complete the address: ", 10115 Berlin", ", London NW1 6XE", ", Washington, DC 20500"
_ADDRESS_TAIL = _rx(rf"(?:,?\s+(?:[A-Z]{{1,2}}-)?\d{{4,5}}\s+{CAP}(?:\s+{CAP})?"
                    rf"|,\s+{CAP}(?:\s+{CAP}){{0,2}}(?:,?\s+[A-Z]{{2}})?(?:\s+\d{{5}}(?:-\d{{4}})?)?"
                    rf"|,?\s+[A-Z]{{2}}\s+\d{{5}}(?:-\d{{4}})?"
                    r"|,?\s+[A-Z]{1,2}\d[A-Z\d]?\s?\d[A-Z]{2})")
_ADDRESS_HEAD = _rx(r"(?:(?:Flat|Apartment|Apt\.?|Unit|Suite|Wohnung|Appartement)\s+\w{1,4},?\s+)$", re.IGNORECASE)
_HOSPITAL = [
    _rx(rf"\b(?:St\.?\s+|Saint\s+|San\s+|Sankt\s+)?(?:(?:{CAP}|[A-Z]{{2,4}}|St\.)['’]?s?['’]?\s+(?:(?:of|de|der|del)\s+)?){{1,4}}{HOSPITAL_SUFFIX}\b"),
    _rx(rf"\b{HOSPITAL_PREFIX}\s+(?:(?:rechts|links|der|de|del|della|di|du|des|la|le|am|an)\s+)*{CAP}"
        rf"(?:[\s-]+(?:(?:rechts|links|der|de|del|della|di|du|des|la|le|am|an)\s+)*{CAP})*"),
    _rx(r"\b(?:" + "|".join(re.escape(h) for h in KNOWN_HOSPITALS) + r")\b"),
]
_STD = _rx(rf"(?<![\w-]){STD_TERMS}(?![\w])", re.IGNORECASE)
_STD_UPPER_ONLY = {"aids", "ist", "its", "sti", "stis", "std", "stds", "soa", "hiv", "vih", "hpv"}
_PREGNANCY = _rx(rf"(?<![\w-]){PREGNANCY_TERMS}(?![\w])", re.IGNORECASE)
NAME_WORDS = rf"(?:{PARTICLE}\s+)*{CAP_OR_OPREFIX}(?:\s+(?:{PARTICLE}\s+)*{CAP_OR_OPREFIX}){{0,2}}"
_TITLED = _rx(rf"\b{TITLE}\.?\s+(?P<name>{NAME_WORDS})")
_RELATION = _rx(rf"(?i:\b{RELATION})\s*[:,(]?\s*(?P<name>{CAP_OR_OPREFIX}(?:\s+{CAP_OR_OPREFIX}){{0,2}})")
_PAIR_SUBJECT = _rx(rf"(?:^|(?<=[.!?;]\s))(?P<name>{CAP}\s+{CAP})(?=\s+(?P<verb>[a-z]+))")
_CAP_WORD = _rx(rf"\b{CAP}\b")
CLINICAL_WORDS = set("""
angina pectoris dyspnea dyspnoea dyspnoe syncope chest pain heart disease ecg ekg echo troponin cholesterol blood
pressure rate exercise test stress resting rest male female sex age atypical typical asymptomatic normal abnormal
present absent yes no flat upsloping downsloping thallium fluoroscopy vessels defect reversible fixed hypertension
diabetes smoker smoking history infarct infarction stenosis murmur palpitations fatigue edema oedema cardiology
belastung belastungsdyspnoe brustschmerz thoraxschmerz herz herzinfarkt blutdruck cholesterin ruhe douleur thoracique
dolor torácico
""".split())
_NOT_NAME_STARTS = {"The", "A", "An", "This", "That", "Her", "His", "Their", "Our", "No", "Left", "Right", "Chest",
                    "Blood", "Heart", "Exercise", "Resting", "Patient", "Known", "Positive", "Negative", "Christmas"}
_PLACEHOLDER = _rx(r"\[(?:" + "|".join(LABELS) + r")(?::[A-Z]+)?\]|\[SENSITIVE:[A-Z]+\]")


def _digits(s: str) -> int:
    return sum(c.isdigit() for c in s)


class PIIGuard:
    """Detect and replace identifiers; tier and (by policy) redact sensitive content. Keeps counts."""

    def __init__(self, text_max_tier: int = DEFAULT_TEXT_MAX_TIER, names: Iterable[str] = (), hospitals: Iterable[str] = (),
                 vocabulary: Iterable[str] = ()):
        """names/hospitals: extra terms always replaced (e.g. the consortium's site names);
        vocabulary: words never taken for a name (e.g. every word of the public dictionary)."""
        self.text_max_tier = text_max_tier
        self.vocabulary = CLINICAL_WORDS | {w.lower() for v in vocabulary for w in re.findall(r"[^\W\d_]+", v)}
        self.counts: Counter[str] = Counter()
        self.redacted: Counter[str] = Counter()
        self.texts = 0
        extra_h = [h for h in hospitals if h.strip()]
        self._extra_hospitals = _rx(r"\b(?:" + "|".join(re.escape(h) for h in extra_h) + r")\b") if extra_h else None
        extra_n = [n for n in names if n.strip()]
        self._extra_names = _rx(r"\b(?:" + "|".join(re.escape(n) for n in extra_n) + r")\b") if extra_n else None

    # ------------------------------------------------------------------ detection
    def find(self, text: str) -> list[Finding]:
        """Non-overlapping findings in text order; earlier detectors win overlaps (identifiers first)."""
        taken: list[Finding] = []
        protected = [(m.start(), m.end()) for m in _PLACEHOLDER.finditer(text)]

        def add(start: int, end: int, label: str) -> None:
            while end > start and text[end - 1] in " ,.;:-":
                end -= 1
            if end <= start:
                return
            if any(s < end and start < e for s, e in protected):
                return
            for i, f in enumerate(taken):
                if f.start < end and start < f.end:
                    if f.label == label:  # the same entity seen by two patterns: keep the union
                        s, e = min(f.start, start), max(f.end, end)
                        taken[i] = Finding(s, e, label, text[s:e])
                    return
            taken.append(Finding(start, end, label, text[start:end]))

        for m in _EMAIL.finditer(text):
            add(m.start(), m.end(), "EMAIL")
        for m in _ID_CONTEXT.finditer(text):
            s = e = m.start("value")
            for tok in re.finditer(r"\S+", m.group("value")):  # ID tokens: digits, or 1-2 capitals (NINO "QQ", "C")
                t = tok.group(0).rstrip(".,;:")
                if not (any(c.isdigit() for c in t) and t.upper() == t or (len(t) <= 3 and t.isalpha() and t.isupper())):
                    break
                e = m.start("value") + tok.start() + len(t)
            v = text[s:e]
            if _digits(v) >= 4 and not _DATE.match(v.strip()):
                add(s, e, "ID")
        for rx in _ID_FORMATS:
            for m in rx.finditer(text):
                add(m.start(), m.end(), "ID")
        for m in _PHONE.finditer(text):
            s, e = m.start(), m.end()
            while text[e - 1] == ")" and text[s:e].count("(") < text[s:e].count(")"):
                e -= 1
            span = text[s:e].strip()
            n = _digits(span)
            if _DATE.match(span) or re.fullmatch(r"\d+[.,]\d{1,2}", span) or re.fullmatch(r"\d{1,2}:\d{2}", span):
                continue
            context = _PHONE_CONTEXT.search(text[max(0, s - 30):s])
            grouped = bool(re.search(r"[\s().-]", span)) or span.startswith("+")
            if (n >= 9 and grouped) or (n >= 10) or (n >= 7 and context) or (span.startswith("+") and n >= 7):
                if n <= 15:
                    add(s, e, "PHONE")
        for rx in _ADDRESS:
            for m in rx.finditer(text):
                s, e = m.start(), m.end()
                if rx is _ADDRESS[1] and text[s:e].split()[0].lower() in ("the", "a", "on", "at"):
                    continue
                for _ in range(3):
                    tail = _ADDRESS_TAIL.match(text, e) if rx is not _ADDRESS[5] else None
                    if not tail:
                        break
                    e = tail.end()
                head = _ADDRESS_HEAD.search(text[:s])
                if head:
                    s = head.start()
                add(s, e, "ADDRESS")
        if self._extra_hospitals:
            for m in self._extra_hospitals.finditer(text):
                add(m.start(), m.end(), "HOSPITAL")
        for rx in _HOSPITAL:
            for m in rx.finditer(text):
                s = m.start()
                first = text[s:m.end()].split()[0]
                if first in ("The", "A", "An", "In", "At", "From", "To", "Our", "This", "Her", "His", "Their"):
                    s += len(first) + 1
                add(s, m.end(), "HOSPITAL")
        for start, end in self._names(text):
            add(start, end, "NAME")
        for m in _STD.finditer(text):
            if m.group(0).lower() in _STD_UPPER_ONLY and not m.group(0).isupper():
                continue
            add(m.start(), m.end(), "STD")
        for m in _PREGNANCY.finditer(text):
            add(m.start(), m.end(), "PREGNANCY")
        return sorted(taken, key=lambda f: f.start)

    def _names(self, text: str) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        if self._extra_names:
            out += [(m.start(), m.end()) for m in self._extra_names.finditer(text)]
        for rx in (_TITLED, _RELATION):
            for m in rx.finditer(text):
                s, e = m.start("name"), m.end("name")
                words = text[s:e].split()
                # stop at the first word that is a verb-like or eponym continuation
                keep = []
                for w in words:
                    if w.lower() in VERBS_AFTER_NAME or w.lower() in EPONYM_NEXT or w.lower() in self.vocabulary:
                        break
                    keep.append(w)
                if keep:
                    name = " ".join(keep)
                    name = re.sub(r"['’]s$", "", name)
                    out.append((s, s + len(name)))
        for m in _PAIR_SUBJECT.finditer(text):
            first, last = m.group("name").split()
            if (m.group("verb") in VERBS_AFTER_NAME and first.lower() not in EPONYMS and last.lower() not in EPONYMS
                    and not {first.lower(), last.lower()} & self.vocabulary
                    and last.lower() not in EPONYM_NEXT and first not in _NOT_NAME_STARTS):
                out.append((m.start("name"), m.end("name")))
        words = list(_CAP_WORD.finditer(text))
        for i, m in enumerate(words):
            w = m.group(0)
            base = re.sub(r"['’]s$", "", w)
            low = base.lower()
            if low not in FIRST_NAMES or low in EPONYMS:
                continue
            nxt = words[i + 1] if i + 1 < len(words) and text[m.end():words[i + 1].start()] == " " else None
            after = text[m.end():].lstrip()
            next_word = after.split(" ", 1)[0].strip(".,;:").lower() if after else ""
            at_start = m.start() == 0 or text[:m.start()].rstrip().endswith((".", "!", "?", ":", ";"))
            if nxt is not None and base == w:
                surname = nxt.group(0)
                if surname.lower() in self.vocabulary:
                    continue
                following = text[nxt.end():].lstrip().split(" ", 1)[0].strip(".,;:").lower()
                if (surname.lower() in EPONYMS or following in EPONYM_NEXT
                        or surname.lower() in EPONYM_NEXT):
                    continue
                out.append((m.start(), nxt.end()))
                continue
            if low in AMBIGUOUS_FIRST:
                # a bare ambiguous name: only as a sentence subject followed by a typical verb,
                # or in the possessive form before a relation ("Lisa's husband")
                if at_start and next_word in VERBS_AFTER_NAME and w == base:
                    out.append((m.start(), m.start() + len(base)))
                continue
            if w != base or next_word in VERBS_AFTER_NAME or not at_start:
                out.append((m.start(), m.start() + len(base)))
        return out

    # ------------------------------------------------------------------ replacement
    def scrub(self, text: str, about_patient: bool = True) -> tuple[str, list[Finding]]:
        """Text with identifiers replaced and, in text about a patient, over-tier sensitive content
        redacted; the findings. Knowledge about variables ("pregnancy is impossible with male sex")
        is not about a patient: its sensitive terms are counted, not redacted."""
        findings = self.find(text)
        self.texts += 1
        out, pos = [], 0
        for f in findings:
            self.counts[f.label] += 1
            out.append(text[pos:f.start])
            if f.label in PLACEHOLDER:
                out.append(PLACEHOLDER[f.label])
            elif about_patient and f.tier is not None and f.tier > self.text_max_tier:
                self.redacted[f.label] += 1
                out.append(f"[SENSITIVE:{f.label}]")
            else:
                out.append(f.text)
            pos = f.end
        out.append(text[pos:])
        return "".join(out), findings

    def report(self) -> dict:
        """Counts for the release manifest."""
        return {"texts_checked": self.texts,
                "identifiers_replaced": {k: self.counts[k] for k in IDENTIFIERS if self.counts[k]},
                "sensitive_found": {k: self.counts[k] for k in SENSITIVE_TIERS if self.counts[k]},
                "sensitive_redacted": dict(self.redacted),
                "sensitive_tiers": dict(SENSITIVE_TIERS), "text_max_tier": self.text_max_tier}


def text_max_tier(dictionary_content: dict) -> int:
    """The dictionary's policy for sensitive content in generated text: `[llm] text_max_tier` (default 2)."""
    value = (dictionary_content.get("llm") or {}).get("text_max_tier", DEFAULT_TEXT_MAX_TIER)
    if value not in (1, 2, 3):
        from ...common.errors import DictionaryError
        raise DictionaryError(f"[llm] text_max_tier must be 1, 2 or 3, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------- evaluation
@dataclass
class Scores:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0


def evaluate(examples: Iterable[dict], guard: PIIGuard | None = None) -> dict[str, Scores]:
    """Entity-level scores per label and overall ("ALL"): a finding counts if it overlaps a gold
    entity of the same label; a gold entity is found if some same-label finding overlaps it."""
    guard = guard or PIIGuard()
    scores: dict[str, Scores] = {label: Scores() for label in LABELS + ("ALL", "ANY_IDENTIFIER")}
    for ex in examples:
        text = ex["text"]
        gold = []
        for ent in ex["entities"]:
            s = text.index(ent["text"])
            gold.append((s, s + len(ent["text"]), ent["label"]))
        found = guard.find(text)
        for f in found:
            hit = any(g[2] == f.label and g[0] < f.end and f.start < g[1] for g in gold)
            for k in (f.label, "ALL"):
                if hit:
                    scores[k].tp += 1
                else:
                    scores[k].fp += 1
            if not hit:
                scores["ALL"].errors.append(f"{ex['id']} FP {f.label} {f.text!r}")
        for s, e, label in gold:
            if not any(f.label == label and f.start < e and s < f.end for f in found):
                scores[label].fn += 1
                scores["ALL"].fn += 1
                scores["ALL"].errors.append(f"{ex['id']} FN {label} {text[s:e]!r}")
        # Privacy view: was an identifier replaced at all, whichever identifier placeholder it got?
        gold_ids = [g for g in gold if g[2] in IDENTIFIERS]
        found_ids = [f for f in found if f.label in IDENTIFIERS]
        any_id = scores["ANY_IDENTIFIER"]
        for f in found_ids:
            if any(g[0] < f.end and f.start < g[1] for g in gold_ids):
                any_id.tp += 1
            else:
                any_id.fp += 1
        any_id.fn += sum(1 for g in gold_ids if not any(f.start < g[1] and g[0] < f.end for f in found_ids))
    return scores


def load_examples(path: str | Path, split: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if split is None or r.get("split") == split]


def main(argv: list[str] | None = None) -> int:
    """python -m ppsehr.server.llm.pii LABELLED.jsonl [--split dev|test] [-v]"""
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0]
    split = argv[argv.index("--split") + 1] if "--split" in argv else None
    scores = evaluate(load_examples(path, split))
    for label, s in scores.items():
        if s.tp + s.fp + s.fn:
            print(f"{label:<10} precision {s.precision:.3f}  recall {s.recall:.3f}  (tp {s.tp}, fp {s.fp}, fn {s.fn})")
    if "-v" in argv:
        print("\n".join(scores["ALL"].errors))
    return 0


if __name__ == "__main__":
    sys.exit(main())
