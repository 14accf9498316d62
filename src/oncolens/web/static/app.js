// OncoLens web app: drag-and-drop with previews, early file checks, upload progress, heat-map
// placeholders and opacity. No dependencies.
(function () {
  "use strict";
  var ACCEPTED = ["image/jpeg", "image/png", "image/bmp", "image/tiff", "image/webp", "application/dicom"];
  var EXTENSIONS = /\.(jpe?g|png|bmp|tiff?|webp|dcm)$/i;

  function setupAnalyze(form) {
    var input = form.querySelector("[data-files]");
    var drop = form.querySelector("[data-drop]");
    var previews = form.querySelector("[data-previews]");
    var error = form.querySelector("[data-file-error]");
    if (!input || !drop) return;

    function show(files) {
      previews.textContent = "";
      var bad = [];
      Array.prototype.forEach.call(files, function (file) {
        var ok = ACCEPTED.indexOf(file.type) >= 0 || EXTENSIONS.test(file.name);
        if (!ok) { bad.push(file.name); return; }
        var figure = document.createElement("figure");
        var caption = document.createElement("figcaption");
        caption.textContent = file.name;
        if (file.type.indexOf("image/") === 0 && file.type !== "image/tiff") {
          var img = document.createElement("img");
          img.alt = "Preview of " + file.name;
          img.src = URL.createObjectURL(file);
          figure.appendChild(img);
        }
        figure.appendChild(caption);
        previews.appendChild(figure);
      });
      if (bad.length) {
        error.hidden = false;
        error.textContent = "Not an image OncoLens can read: " + bad.join(", ") + ". Use JPEG, PNG, BMP, TIFF, WebP or DICOM.";
      } else {
        error.hidden = true;
        error.textContent = "";
      }
    }

    input.addEventListener("change", function () { show(input.files); });
    ["dragenter", "dragover"].forEach(function (name) {
      drop.addEventListener(name, function (event) { event.preventDefault(); drop.classList.add("over"); });
    });
    ["dragleave", "drop"].forEach(function (name) {
      drop.addEventListener(name, function (event) { event.preventDefault(); drop.classList.remove("over"); });
    });
    drop.addEventListener("drop", function (event) {
      if (event.dataTransfer && event.dataTransfer.files.length) {
        input.files = event.dataTransfer.files;
        show(input.files);
      }
    });
    drop.addEventListener("keydown", function (event) {
      if (event.key === "Enter" || event.key === " ") { event.preventDefault(); input.click(); }
    });
    form.addEventListener("submit", function (event) {
      var button = form.querySelector("button[type=submit]");
      if (button) { button.disabled = true; button.textContent = "Analyzing…"; }
      if (!window.XMLHttpRequest || !window.FormData || !window.DOMParser) return; // the plain form post
      event.preventDefault();
      upload(form, button);
    });
  }

  // Posts the form with a progress bar. A result replaces the page; an error is shown above the
  // button and the chosen files and fields stay, so nothing has to be picked again.
  function upload(form, button) {
    var box = form.querySelector("[data-upload]");
    var bar = form.querySelector("[data-upload-progress]");
    var text = form.querySelector("[data-upload-text]");
    var failed = form.querySelector("[data-submit-error]");
    failed.hidden = true;
    box.hidden = false;
    bar.value = 0;
    text.textContent = "Uploading…";
    var xhr = new XMLHttpRequest();
    xhr.open("POST", form.action);
    xhr.upload.addEventListener("progress", function (event) {
      if (!event.lengthComputable) return;
      var pct = Math.round((100 * event.loaded) / event.total);
      bar.value = pct;
      text.textContent = "Uploading " + pct + "%";
    });
    xhr.upload.addEventListener("load", function () {
      bar.removeAttribute("value"); // indeterminate while the server analyses
      text.textContent = "Analyzing…";
    });
    function again(message) {
      box.hidden = true;
      text.textContent = "";
      bar.value = 0;
      failed.hidden = false;
      failed.textContent = message;
      if (button) { button.disabled = false; button.textContent = "Analyze"; }
    }
    xhr.addEventListener("load", function () {
      var page = new DOMParser().parseFromString(xhr.responseText, "text/html");
      var message = page.querySelector("[data-testid=error], main .error[role=alert]");
      if (xhr.status >= 400 || !page.querySelector("[data-testid=case-link]")) {
        again(message ? message.textContent : "The analysis failed (HTTP " + xhr.status + "). Try again.");
        return;
      }
      document.open();
      document.write(xhr.responseText);
      document.close();
    });
    xhr.addEventListener("error", function () { again("The upload failed: check the connection and try again."); });
    xhr.send(new FormData(form));
  }

  // Heat-maps come a moment after the page: the image shows a placeholder until its map has loaded.
  function setupHeatmaps() {
    document.querySelectorAll("[data-heat-stack]").forEach(function (stack) {
      var heat = stack.querySelector("img.heat");
      function done() { stack.classList.remove("loading"); }
      if (!heat || (heat.complete && heat.naturalWidth > 0)) { done(); return; }
      heat.addEventListener("load", done);
      heat.addEventListener("error", function () { done(); stack.classList.add("failed"); });
    });
  }

  function setupSliders() {
    document.querySelectorAll("[data-heat-slider]").forEach(function (slider) {
      var heat = slider.closest("figure").querySelector("img.heat");
      if (!heat) return;
      slider.addEventListener("input", function () { heat.style.opacity = String(slider.value / 100); });
    });
  }

  // The case filters start folded on a phone (the list comes first) and open on a wider screen.
  function setupFilters() {
    document.querySelectorAll("[data-filters]").forEach(function (box) {
      if (window.matchMedia && window.matchMedia("(min-width: 720px)").matches) box.open = true;
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    setupFilters();
    document.querySelectorAll("[data-analyze-form]").forEach(setupAnalyze);
    setupSliders();
    setupHeatmaps();
  });
})();
