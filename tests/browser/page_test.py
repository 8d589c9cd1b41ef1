"""The explorer page in a real browser: headless Chromium driven by Selenium (WebDriver).

Usage: python3 tests/browser/page_test.py SERVER_URL IMAGE SCREENSHOT_PNG

Loads the page, uploads IMAGE through the file input, captions it, clicks each word and checks
that the overlay shown is that word's (the same data URL the API returned for it), asks a
question, and saves a screenshot. Needs Debian's chromium and chromium-driver and pip's selenium
(.ci/run installs them); it fails, never skips, without them.
"""

import os
import sys

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait


def main(url, image, screenshot):
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(url + "/")
        wait.until(lambda d: d.execute_script("return window.gradcamReady === true"))
        driver.find_element(By.ID, "file").send_keys(os.path.realpath(image))
        wait.until(lambda d: d.find_element(By.ID, "preview").get_attribute("src").startswith("blob:"))

        driver.find_element(By.ID, "caption-run").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#words button")) > 0)
        words = driver.find_elements(By.CSS_SELECTOR, "#words button")
        caption = " ".join(w.text for w in words)
        print("caption:", caption)
        for i, word in enumerate(words):
            word.click()
            shown = driver.find_element(By.ID, "caption-overlay")
            expected = driver.execute_script("return window.lastCaption.words.find(w => w.t === arguments[0]).overlay", i)
            assert shown.get_attribute("data-word") == str(i), (i, shown.get_attribute("data-word"))
            assert shown.get_attribute("src") == expected, f"the overlay shown for word {i} ({word.text}) is not that word's"
            assert "on" in word.get_attribute("class").split(), f"word {i} is not marked as chosen"
        # Two different words have different maps: the page is not showing one picture for all.
        overlays = driver.execute_script("return window.lastCaption.words.map(w => w.overlay)")
        assert len(set(overlays)) > 1, "every word has the same overlay"
        print("word overlay matches for", len(words), "words")

        question = driver.find_element(By.ID, "question")
        question.clear()
        question.send_keys("what color is the triangle?")
        driver.find_element(By.ID, "vqa-run").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#answers tr")) > 0)
        answer = driver.find_element(By.CSS_SELECTOR, "#answers tr td").text
        print("answer:", answer)
        wait.until(ec.visibility_of_element_located((By.ID, "counterfactual-overlay")))
        assert driver.find_element(By.ID, "counterfactual-overlay").get_attribute("src").startswith("data:image/png")
        # Pick the word whose map reads best for the screenshot: the shape (last word), if any.
        words[min(2, len(words) - 1)].click()
        driver.save_screenshot(screenshot)
        print("screenshot:", screenshot)
    finally:
        driver.quit()


if __name__ == "__main__":
    main(*sys.argv[1:4])
