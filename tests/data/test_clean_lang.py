"""Language identification in cleaning (data/clean_lang.py): paragraphs written for this test in
each profiled language (several topics and registers each), the confusable pairs, the
`clean.languages` filter, each language's own stop-word rule, and the report's counts."""

from __future__ import annotations

import json

import ml_collections
import pytest

from flaxlm.data import clean, preprocess
from flaxlm.data.clean_lang import PROFILES, STOP_WORDS, identify

PARAGRAPHS = {
    "en": [
        "The committee met on Tuesday to discuss the budget for the coming year. Most of the "
        "members agreed that the library needs a new roof before winter, but there was a long "
        "argument about whether the money should come from the parks fund or from a new tax.",
        "I have been learning to bake bread at home. It took me a few weeks to get the dough "
        "right, and my first loaves were flat and dense. Now they rise well, and my children "
        "ask for toast with butter every morning before they leave for school.",
        "To install the package, run the command below from a terminal. If the build fails, "
        "check that your compiler is recent enough and that the headers are on your path; "
        "most errors we have seen come from an old version of the toolchain.",
    ],
    "de": [
        "Der Gemeinderat hat am Dienstag über den Haushalt für das kommende Jahr beraten. Die "
        "meisten Mitglieder waren sich einig, dass die Bibliothek vor dem Winter ein neues Dach "
        "braucht, aber es gab einen langen Streit darüber, woher das Geld kommen soll.",
        "Ich backe seit einigen Wochen mein eigenes Brot. Die ersten Laibe waren flach und "
        "schwer, weil der Teig nicht lange genug geruht hat. Inzwischen geht er gut auf, und "
        "die Kinder wollen jeden Morgen Toast mit Butter, bevor sie zur Schule gehen.",
        "Um das Paket zu installieren, führen Sie den folgenden Befehl in einem Terminal aus. "
        "Wenn der Build fehlschlägt, prüfen Sie, ob Ihr Compiler aktuell ist und ob die "
        "Header im Suchpfad liegen; die meisten Fehler kommen von einer alten Version.",
    ],
    "fr": [
        "Le conseil municipal s'est réuni mardi pour discuter du budget de l'année prochaine. "
        "La plupart des membres étaient d'accord pour dire que la bibliothèque a besoin d'un "
        "nouveau toit avant l'hiver, mais il y a eu un long débat sur l'origine de l'argent.",
        "J'apprends à faire du pain à la maison depuis quelques semaines. Mes premières miches "
        "étaient plates et lourdes, car la pâte ne reposait pas assez longtemps. Maintenant "
        "elle lève bien, et les enfants veulent des tartines avec du beurre tous les matins.",
        "Pour installer le paquet, lancez la commande suivante dans un terminal. Si la "
        "compilation échoue, vérifiez que votre compilateur est assez récent et que les "
        "en-têtes sont dans le chemin; la plupart des erreurs viennent d'une vieille version.",
    ],
    "es": [
        "El consejo municipal se reunió el martes para hablar del presupuesto del próximo año. "
        "La mayoría de los miembros estuvo de acuerdo en que la biblioteca necesita un techo "
        "nuevo antes del invierno, pero hubo una larga discusión sobre de dónde sacar el dinero.",
        "Hace unas semanas que aprendo a hacer pan en casa. Mis primeras hogazas salieron "
        "planas y pesadas, porque la masa no reposaba lo suficiente. Ahora sube bien, y los "
        "niños piden tostadas con mantequilla todas las mañanas antes de ir a la escuela.",
        "Para instalar el paquete, ejecute el siguiente comando en una terminal. Si la "
        "compilación falla, compruebe que su compilador es reciente y que las cabeceras están "
        "en la ruta; la mayoría de los errores vienen de una versión antigua de las herramientas.",
    ],
    "it": [
        "Il consiglio comunale si è riunito martedì per discutere il bilancio del prossimo "
        "anno. La maggior parte dei membri era d'accordo sul fatto che la biblioteca ha bisogno "
        "di un tetto nuovo prima dell'inverno, ma c'è stata una lunga discussione sui fondi.",
        "Da qualche settimana imparo a fare il pane in casa. Le prime pagnotte erano basse e "
        "pesanti, perché l'impasto non riposava abbastanza. Adesso lievita bene, e i bambini "
        "vogliono pane tostato con il burro ogni mattina prima di andare a scuola.",
        "Per installare il pacchetto, eseguite il comando seguente in un terminale. Se la "
        "compilazione non riesce, controllate che il compilatore sia recente e che le "
        "intestazioni siano nel percorso; la maggior parte degli errori viene da una versione "
        "vecchia degli strumenti.",
    ],
    "pt": [
        "O conselho municipal reuniu-se na terça-feira para discutir o orçamento do próximo "
        "ano. A maioria dos membros concordou que a biblioteca precisa de um telhado novo "
        "antes do inverno, mas houve uma longa discussão sobre a origem do dinheiro.",
        "Há algumas semanas que aprendo a fazer pão em casa. Os primeiros pães ficaram baixos "
        "e pesados, porque a massa não descansava o suficiente. Agora cresce bem, e as "
        "crianças pedem torradas com manteiga todas as manhãs antes de irem para a escola.",
        "Para instalar o pacote, execute o comando seguinte num terminal. Se a compilação "
        "falhar, verifique se o seu compilador é recente e se os cabeçalhos estão no caminho; "
        "a maior parte dos erros vem de uma versão antiga das ferramentas.",
    ],
    "nl": [
        "De gemeenteraad kwam dinsdag bijeen om de begroting voor het komende jaar te "
        "bespreken. De meeste leden waren het erover eens dat de bibliotheek voor de winter "
        "een nieuw dak nodig heeft, maar er was een lange discussie over waar het geld vandaan "
        "moet komen.",
        "Ik leer sinds een paar weken thuis brood bakken. Mijn eerste broden waren plat en "
        "zwaar, omdat het deeg niet lang genoeg had gerust. Nu rijst het goed, en de kinderen "
        "willen elke ochtend geroosterd brood met boter voordat ze naar school gaan.",
        "Om het pakket te installeren, voert u de volgende opdracht uit in een terminal. Als "
        "het bouwen mislukt, controleer dan of uw compiler recent genoeg is en of de headers "
        "in het zoekpad staan; de meeste fouten komen van een oude versie.",
    ],
    "sv": [
        "Kommunfullmäktige sammanträdde på tisdagen för att diskutera budgeten för nästa år. "
        "De flesta ledamöterna var överens om att biblioteket behöver ett nytt tak före "
        "vintern, men det blev en lång diskussion om var pengarna ska komma ifrån.",
        "Jag har lärt mig att baka bröd hemma under några veckor. De första limporna blev "
        "platta och tunga, eftersom degen inte fick vila tillräckligt länge. Nu jäser den bra, "
        "och barnen vill ha rostat bröd med smör varje morgon innan de går till skolan.",
        "För att installera paketet kör du följande kommando i en terminal. Om bygget "
        "misslyckas, kontrollera att din kompilator är tillräckligt ny och att filerna finns "
        "i sökvägen; de flesta fel som vi har sett kommer från en gammal version.",
    ],
    "pl": [
        "Rada miejska zebrała się we wtorek, aby omówić budżet na przyszły rok. Większość "
        "członków zgodziła się, że biblioteka potrzebuje nowego dachu przed zimą, ale była "
        "długa dyskusja o tym, skąd wziąć na to pieniądze.",
        "Od kilku tygodni uczę się piec chleb w domu. Pierwsze bochenki były płaskie i ciężkie, "
        "bo ciasto nie odpoczywało wystarczająco długo. Teraz rośnie dobrze, a dzieci chcą "
        "co rano tosty z masłem, zanim pójdą do szkoły.",
        "Aby zainstalować pakiet, uruchom poniższe polecenie w terminalu. Jeśli kompilacja się "
        "nie powiedzie, sprawdź, czy kompilator jest wystarczająco nowy i czy nagłówki są na "
        "ścieżce; większość błędów, które widzieliśmy, pochodzi ze starej wersji.",
    ],
    "ru": [
        "Городской совет собрался во вторник, чтобы обсудить бюджет на следующий год. "
        "Большинство членов совета согласились, что библиотеке нужна новая крыша до зимы, но "
        "был долгий спор о том, откуда взять деньги.",
        "Я уже несколько недель учусь печь хлеб дома. Первые буханки были плоскими и "
        "тяжёлыми, потому что тесто не отдыхало достаточно долго. Теперь оно хорошо "
        "поднимается, и дети каждое утро просят тосты с маслом, когда идут в школу.",
        "Чтобы установить пакет, выполните следующую команду в терминале. Если сборка не "
        "удалась, проверьте, что компилятор достаточно новый и что заголовки есть в пути; "
        "большинство ошибок, которые мы видели, это старая версия инструментов.",
    ],
    "uk": [
        "Міська рада зібралася у вівторок, щоб обговорити бюджет на наступний рік. Більшість "
        "членів ради погодилися, що бібліотеці потрібен новий дах до зими, але була довга "
        "суперечка про те, звідки взяти гроші.",
        "Я вже кілька тижнів вчуся пекти хліб удома. Перші буханці були пласкими і важкими, "
        "бо тісто не відпочивало достатньо довго. Тепер воно добре піднімається, і діти "
        "щоранку просять тости з маслом, коли йдуть до школи.",
        "Щоб встановити пакет, виконайте таку команду в терміналі. Якщо збірка не вдалася, "
        "перевірте, що компілятор достатньо новий і що заголовки є в шляху; більшість "
        "помилок, які ми бачили, це стара версія інструментів.",
    ],
}


def _script(code):
    return next(s for s, table in PROFILES.items() if code in table)


@pytest.mark.parametrize("code", sorted(PARAGRAPHS))
def test_every_paragraph_is_identified_as_its_language(code):
    for text in PARAGRAPHS[code]:
        stats = clean.DocStats(text)
        assert stats.script == _script(code)
        assert stats.language == code, text[:60]
        # and each sentence alone (12-25 words) where it names a language at all
        for sentence in text.split(". "):
            assert identify(sentence, _script(code)) in (code, "und"), sentence


def test_every_profiled_language_has_paragraphs_and_a_stop_list():
    profiled = {code for table in PROFILES.values() for code in table}
    assert profiled == set(PARAGRAPHS) and profiled < set(STOP_WORDS)
    for code, words in STOP_WORDS.items():  # the rule's words are the profile's own
        if code != "zh":
            assert words <= PROFILES[_script(code)][code], code


def test_confusable_languages_are_told_apart_by_their_own_words():
    # One sentence each, full of the words Spanish, Portuguese and Italian share.
    assert (
        identify("Ella dijo que no era para él, pero sí para los niños de la casa.", "latin")
        == "es"
    )
    assert (
        identify("Ela disse que não era para ele, mas sim para os filhos da casa.", "latin") == "pt"
    )
    assert identify("Lei ha detto che non era per lui, ma per i figli della casa.", "latin") == "it"
    assert identify("Hij zei dat het niet voor hem was, maar voor de kinderen.", "latin") == "nl"
    assert identify("Er sagte, dass es nicht für ihn war, sondern für die Kinder.", "latin") == "de"
    assert identify("Він сказав, що це не для нього, а для дітей.", "cyrillic") == "uk"
    assert identify("Он сказал, что это не для него, а для детей.", "cyrillic") == "ru"


def test_what_no_profile_names_is_undetermined():
    assert identify("Lorem ipsum dolor sit amet, consectetur adipiscing elit.", "latin") == "und"
    # Finnish: "on" (is) is English's "on", one word is not a language
    assert identify("Kissa on pöydällä ja koira on lattialla, talo on suuri.", "latin") == "und"
    assert identify("x = f(y) + g(z) // 42", "latin") == "und"
    assert identify("the", "latin") == "und"  # (MIN_DISTINCT = 2)
    assert identify("de la", "latin") == "und"  # French and Spanish tie: neither is named
    assert identify("de la de", "latin") == "und"
    assert identify("de la el", "latin") == "es"


def test_words_are_letter_runs_and_the_most_profile_words_win():
    # French elision: "l'homme" is "l" + "homme", "qu'il" is "qu" + "il"
    assert identify("C'est l'homme qu'il aime, d'un pays où l'on rêve.", "latin") == "fr"
    # occurrences, not distinct words, decide (es: 6 of 2 words; it: 4 of 4)
    assert identify("el el el el el la casa il che non", "latin") == "es"
    assert clean.DocStats("Καλημέρα σας, τι κάνετε σήμερα;").language == "greek"
    assert clean.DocStats("東京は日本の首都です。とても大きな都市です。").language == "ja"


def _config(**kw):
    c = clean.clean_config()
    c.min_words = 20
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def _reason(text, **kw):
    return clean.first_failure(clean.DocStats(text), _config(**kw))


def test_languages_keeps_the_ones_named_and_drops_the_rest_as_language():
    de, fr, en = PARAGRAPHS["de"][0], PARAGRAPHS["fr"][0], PARAGRAPHS["en"][0]
    assert _reason(en) is None
    assert _reason(de) == _reason(fr) == "language"  # the default keeps en and zh
    assert (
        _reason(de, languages=("en", "de")) is None
        and _reason(fr, languages=("en", "de")) == "language"
    )
    assert _reason(en, languages=("de",)) == "language"
    for code, texts in PARAGRAPHS.items():  # () keeps every language that passes its rule
        scripts = (_script(code),)
        assert all(_reason(t, languages=(), scripts=scripts) is None for t in texts), code


def test_each_language_is_held_to_its_own_stop_words():
    # French prose with no French stop word: the language is named (profile words), the rule fails.
    text = " ".join(["nous", "sommes", "dans", "une", "maison", "avec", "elle", "sur", "mais"] * 3)
    assert identify(text, "latin") == "fr"
    assert not STOP_WORDS["fr"] & set(text.split())
    loose = dict(max_top_ngram_char_frac=(1, 1, 1), max_dup_ngram_char_frac=(1,) * 6)
    assert _reason(text, languages=("fr",), **loose) == "stop_words"
    assert _reason(text + " et la", languages=("fr",), **loose) is None  # two of French's list
    # Latin text of no language is held to English's list, as before languages were told apart
    und = " ".join(f"zor{c}{d}ak" for c in "bcdfgklmnp" for d in "aeiou")  # 50 words, none real
    assert clean.DocStats(und).language == "und"
    assert _reason(und + " the", min_stop_words=1, languages=()) is None  # one Gopher word
    assert _reason(und + " ok", min_stop_words=1, languages=()) == "stop_words"
    # (two Gopher words name English: undetermined text can never pass the default rule)
    assert clean.DocStats(und + " the of").language == "en"
    assert _reason(und, languages=()) == "stop_words"
    # the default languages do not drop it: undetermined text is the stop-word rule's to judge
    assert _reason(und + " the", min_stop_words=1) is None
    assert _reason(und, min_stop_words=0) is None  # (min_stop_words=0 keeps it, as before)


def test_unknown_or_malformed_languages_are_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"clean.languages: unknown \['ge'\]"):
        clean.Cleaner(_config(languages=("en", "ge")))
    with pytest.raises(ValueError, match=r"clean.languages: unknown \['und'\]"):
        clean.Cleaner(_config(languages=("und",)))
    with pytest.raises(ValueError, match=r"clean.languages='fr': a tuple"):  # not ('f', 'r')
        clean.Cleaner(ml_collections.ConfigDict({**_config().to_dict(), "languages": "fr"}))
    clean.Cleaner(_config(languages=("greek", "ja", "uk")))  # script-named and CJK ones are known


@pytest.mark.parametrize(
    "raw,value",
    [("('en','fr')", ("en", "fr")), ("en,fr", ("en", "fr")), (" en , fr ", ("en", "fr")),
     ("fr", ("fr",)), ("'fr'", ("fr",)), ("()", ()), ("[]", ())],
)  # fmt: skip
def test_the_cli_reads_a_tuple_of_names_as_written(raw, value):
    cfg = preprocess.preprocess_config()
    preprocess.apply_overrides(cfg, [f"--config.clean.languages={raw}"])
    assert cfg.clean.languages == value  # ("'fr'" was ('f', 'r'); fr and en,fr were refused)
    preprocess.apply_overrides(cfg, ["--config.clean.max_top_ngram_char_frac=0.3,0.2,0.1"])
    assert cfg.clean.max_top_ngram_char_frac == (0.3, 0.2, 0.1)
    for bad in ("en,,fr", "en fr", "(en"):
        with pytest.raises(SystemExit, match=r"clean.languages': cannot read .* as tuple"):
            preprocess.apply_overrides(cfg, [f"--config.clean.languages={bad}"])


def test_the_report_counts_kept_documents_per_language_and_merges():
    cfg = _config(languages=("en", "fr", "de"), redact_pii=False)
    a, b = clean.Cleaner(cfg), clean.Cleaner(cfg)
    for text in PARAGRAPHS["en"] + PARAGRAPHS["fr"][:2]:
        assert a(text) is not None
    for text in PARAGRAPHS["de"][:1] + PARAGRAPHS["es"]:
        b(text)
    a.merge(b)
    rep = a.report()
    assert rep["languages"] == {"en": 3, "fr": 2, "de": 1}
    assert rep["removed"] == {"language": 3} and rep["out"] == 6


def test_the_preprocess_cli_keeps_the_languages_asked_for_and_reports_them(tmp_path):
    rows = [" ".join(PARAGRAPHS[code]) for code in ("en", "fr", "fr", "de", "es")]
    rows[2] = rows[2].replace("mardi", "jeudi")  # (not an exact duplicate of the first)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    out = tmp_path / "out"
    argv = ["--input", str(src), "--output", str(out), "--config.dedup.near=False"]
    report = preprocess.main([*argv, "--config.clean.languages=('en','fr')"])
    stage = next(s for s in report["stages"] if s["stage"] == "clean")
    assert stage["languages"] == {"fr": 2, "en": 1} and report["removed"] == {"language": 2}
    md = (out / "report.md").read_text()
    assert "Languages of the documents cleaning kept: fr: 2, en: 1 (clean.languages)" in md
