// OncoLens web app: drag-and-drop with previews, early file checks, heat-map opacity. No dependencies.
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
    form.addEventListener("submit", function () {
      var button = form.querySelector("button[type=submit]");
      if (button) { button.disabled = true; button.textContent = "Analyzing…"; }
    });
  }

  function setupSliders() {
    document.querySelectorAll("[data-heat-slider]").forEach(function (slider) {
      var heat = slider.closest("figure").querySelector("img.heat");
      if (!heat) return;
      slider.addEventListener("input", function () { heat.style.opacity = String(slider.value / 100); });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-analyze-form]").forEach(setupAnalyze);
    setupSliders();
  });
})();
