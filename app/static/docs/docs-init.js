// Starts Swagger UI on /docs with this server's own /openapi.json (the page's Content
// Security Policy allows no inline script, hence this file). Nothing is loaded from
// elsewhere: no validator badge, no external links followed.
"use strict";
window.addEventListener("DOMContentLoaded", () => {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    validatorUrl: null,
    deepLinking: true,
    persistAuthorization: false,
  });
});
